"""Names of the real-runtime quantizers of a sweep (``runtimes.schemes``), parsed and validated.

A name is ``"<runtime>/<scheme>"``:

* ``"litert/int8"``, ``"litert/16x8"``, ``"litert/float"``: the schemes of
  :mod:`kure_jax.deploy.litert` (full-integer int8; int16 activations with int8 weights; the
  unquantised conversion);
* ``"ort/float"`` or ``"ort/int{8,4}_{per_tensor,per_channel}_{minmax,entropy,percentile}"``
  with an optional ``"_symact"`` suffix: an :class:`~kure_jax.deploy.onnx_runtime.OrtScheme`
  (weight bits, weight scale granularity, ORT's activation calibrator, symmetric activations),
  e.g. ``"ort/int8_per_channel_entropy"``, ``"ort/int4_per_channel_minmax"``.

This module imports neither TensorFlow nor ONNX: the spec validates names at start-up, and
:mod:`kure_jax.evaluation.families.runtimes` runs them.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from kure_jax.deploy import litert
from kure_jax.deploy.onnx_runtime import CALIBRATIONS, OrtScheme

__all__ = ["PACKAGES", "RUNTIMES", "RuntimeScheme", "example_names",
           "missing_packages", "parse_scheme"]

RUNTIMES: tuple[str, ...] = ("litert", "ort")
# runtime -> (import name, pip package) of everything its backend needs.
PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "litert": (("tensorflow", "tensorflow-cpu"), ("ai_edge_litert", "ai-edge-litert")),
    "ort": (("jax2onnx", "jax2onnx"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
}


@dataclasses.dataclass(frozen=True)
class RuntimeScheme:
    """One parsed ``runtimes.schemes`` entry.

    Attributes:
      name: the entry, e.g. ``"ort/int8_per_tensor_minmax"`` (the points' ``quantizer``).
      runtime: ``"litert"`` or ``"ort"``.
      litert_scheme: the :data:`kure_jax.deploy.litert.SCHEMES` name (LiteRT only).
      ort_scheme: the :class:`OrtScheme` (ONNX Runtime only).
      weight_bits: integer weight width, ``None`` for a float scheme.
      act_bits: integer activation width, ``None`` for a float scheme.
      per_channel: per-output-channel weight steps (``None`` for a float scheme).
    """

    name: str
    runtime: str
    litert_scheme: str | None = None
    ort_scheme: OrtScheme | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    per_channel: bool | None = None

    def describe(self) -> dict[str, object]:
        """A JSON-ready description of what the runtime does (the points' ``policy``)."""
        out: dict[str, object] = {"runtime": self.runtime, "weight_bits": self.weight_bits,
                                  "act_bits": self.act_bits, "per_channel": self.per_channel}
        if self.runtime == "litert":
            out.update(scheme=self.litert_scheme, weights="symmetric [-127, 127]" if
                       self.weight_bits else None,
                       activations=None if self.act_bits is None else
                       ("asymmetric int8, min/max" if self.act_bits == 8 else
                        "symmetric int16, min/max"))
        else:
            s = self.ort_scheme
            out.update(scheme=s.name, calibration=None if s.weight_bits is None else s.calibration,
                       symmetric_activations=s.symmetric_activations)
        return out


def example_names() -> tuple[str, ...]:
    """The names ``configs/sweeps/runtimes.py`` turns on (and error messages show)."""
    return ("litert/int8", "litert/16x8", "ort/int8_per_tensor_minmax",
            "ort/int8_per_channel_minmax", "ort/int8_per_channel_entropy",
            "ort/int8_per_channel_percentile", "ort/int4_per_tensor_minmax",
            "ort/int4_per_channel_minmax")


def _bad(name: object, why: str) -> ValueError:
    return ValueError(
        f"sweep key 'runtimes.schemes': {name!r} {why}. Names are "
        f"'litert/<{'|'.join(litert.SCHEMES)}>', 'ort/float' or "
        f"'ort/int<8|4>_<per_tensor|per_channel>_<{'|'.join(CALIBRATIONS)}>[_symact]', "
        f"e.g. {', '.join(example_names()[:3])}."
    )


def parse_scheme(name: object) -> RuntimeScheme:
    """Parses one ``runtimes.schemes`` entry.

    Args:
      name: e.g. ``"litert/int8"`` or ``"ort/int8_per_channel_minmax"``.

    Returns:
      The :class:`RuntimeScheme`.

    Raises:
      ValueError: for anything else, naming the key and the grammar of valid names.
    """
    if not isinstance(name, str) or "/" not in name:
        raise _bad(name, "is not '<runtime>/<scheme>'")
    runtime, _, scheme = name.partition("/")
    if runtime not in RUNTIMES:
        raise _bad(name, f"names an unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if runtime == "litert":
        if scheme not in litert.SCHEMES:
            raise _bad(name, f"names an unknown LiteRT scheme {scheme!r}")
        bits = {"float": (None, None), "int8": (8, 8), "16x8": (8, 16)}[scheme]
        return RuntimeScheme(name, runtime, litert_scheme=scheme, weight_bits=bits[0],
                             act_bits=bits[1], per_channel=None if scheme == "float" else True)
    if scheme == "float":
        return RuntimeScheme(name, runtime, ort_scheme=OrtScheme(weight_bits=None))
    parts = scheme.split("_")
    symmetric = parts[-1] == "symact"
    if symmetric:
        parts = parts[:-1]
    if (len(parts) != 4 or parts[0] not in ("int8", "int4") or parts[1] != "per"
            or parts[2] not in ("tensor", "channel") or parts[3] not in CALIBRATIONS):
        raise _bad(name, f"is not a valid ONNX Runtime scheme {scheme!r}")
    bits = int(parts[0][3:])
    per_channel = parts[2] == "channel"
    ort = OrtScheme(weight_bits=bits, per_channel=per_channel, calibration=parts[3],
                    symmetric_activations=symmetric)
    return RuntimeScheme(name, runtime, ort_scheme=ort, weight_bits=bits, act_bits=8,
                         per_channel=per_channel)


def missing_packages(runtimes: set[str] | frozenset[str]) -> list[str]:
    """The pip packages (in install order) that the given runtimes need and that cannot be
    found, without importing them (``importlib.util.find_spec``)."""
    missing = []
    for runtime in sorted(runtimes):
        for module, pip_name in PACKAGES[runtime]:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a parent package missing, or a None module
                found = False
            if not found and pip_name not in missing:
                missing.append(pip_name)
    return missing
