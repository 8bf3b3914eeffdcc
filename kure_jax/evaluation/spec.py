"""What a robustness sweep evaluates: :class:`SweepSpec`, validated from a sweep config.

A sweep config is an ``ml_collections.ConfigDict`` (see ``configs/sweeps/default.py``, which
documents every key) with the sections ``weight``, ``weight_act``, ``step_ratio``, ``qat``,
``nested``, ``report`` and ``runtimes``. :meth:`SweepSpec.from_config` checks it once, before
any checkpoint is touched: an unknown key, a bad value or an unknown quantizer name is a
``ValueError`` that names the key and the allowed values. Keys a config leaves out take the
defaults of :class:`SweepSpec`; an empty tuple of bit widths (or pairs) skips that section.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import numbers
import pathlib
import runpy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kure_jax import CLIP_METHODS, MAX_BITS, MIN_BITS, QuantPolicy

__all__ = ["LAYER_SELECTIONS", "SweepSpec", "load_sweep"]

LAYER_SELECTIONS: tuple[str, ...] = ("paper", "kernels")

# QuantPolicy fields a named weight quantizer may set (``bits`` comes from the sweep's lists).
_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(QuantPolicy) if f.name != "bits")

# Config key -> SweepSpec field, per section; ``None`` is the top level.
_SCHEMA: dict[str | None, dict[str, str]] = {
    None: {"layers": "layers", "eval_batch_size": "eval_batch_size", "map_chunk": "map_chunk"},
    "weight": {
        "bits": "weight_bits",
        "quantizers": "weight_quantizers",
        "stochastic_seeds": "stochastic_seeds",
    },
    "weight_act": {
        "pairs": "wa_pairs",
        "weight_quantizer": "wa_weight_quantizer",
        "act_clip": "act_clip",
        "act_percentile": "act_percentile",
        "calibration_images": "calibration_images",
        "calibration_seed": "calibration_seed",
    },
    "step_ratio": {
        "bits": "step_ratio_bits",
        "quantizer": "step_ratio_quantizer",
        "start": "step_ratio_start",
        "stop": "step_ratio_stop",
        "num": "step_ratio_num",
    },
    "qat": {"bits": "qat_bits", "step_ratio": "qat_step_ratio"},
    "nested": {"bits": "nested_bits", "nest_bits": "nested_nest_bits",
               "per_channel": "nested_per_channel"},
    "report": {"histogram_layers": "histogram_layers", "plots": "plots"},
    "runtimes": {"schemes": "runtime_schemes", "litert_batch_size": "runtime_batch_size"},
}

_DEFAULT_QUANTIZERS: dict[str, dict[str, Any]] = {
    "max": {},
    "per_channel": {"axis": -1},
    "asym": {"symmetric": False},
    "mse": {"clip": "mse"},
    "aciq": {"clip": "aciq"},
    "percentile": {"clip": "percentile", "percentile": 99.9},
    "stochastic": {"rounding": "stochastic"},
    "floor": {"rounding": "floor"},
    "pow2": {"pow2_step": True},
}


# ConfigDict sorts its keys; quantizers with these names keep this (table column) order,
# others follow alphabetically.
_QUANTIZER_ORDER = (*_DEFAULT_QUANTIZERS, "aciq_laplace")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """Everything a sweep evaluates, per checkpoint (field names follow the config keys).

    Attributes:
      layers: which conv/dense kernels are quantised (and whose inputs, for W/A):
        ``"paper"`` (all but the first conv and the classifier, as the KURE paper) or
        ``"kernels"`` (all).
      eval_batch_size: test images per forward pass.
      map_chunk: points per vectorised chunk of a mapped sweep (step ratios, stochastic
        seeds); ``1`` runs them as a compiled loop (``lax.map``), larger values ``vmap``
        that many points at once (faster on accelerators; on CPU a vmapped conv over
        per-point kernels becomes a slow grouped convolution).
      weight_bits: bit widths of weight-only PTQ (``weight.bits``).
      weight_quantizers: name -> ``QuantPolicy`` fields (all but ``bits``) of each weight
        quantizer implementation (``weight.quantizers``), in the order the default config
        lists them (max, per_channel, asym, mse, aciq, percentile, stochastic, floor, pow2),
        other names after them alphabetically.
      stochastic_seeds: seeds evaluated for each quantizer with stochastic rounding.
      wa_pairs: ``(weight_bits, act_bits)`` pairs of weight+activation PTQ.
      wa_weight_quantizer: name (in ``weight_quantizers``) of the W/A weight quantizer.
      act_clip: clip method of the calibrated activation ranges (a ``CLIP_METHODS`` name).
      act_percentile: percentile for ``act_clip="percentile"``.
      calibration_images: training images used to calibrate activation ranges.
      calibration_seed: which training images (the first batch of that data-order seed).
      step_ratio_bits: bit widths of the step-size sweep.
      step_ratio_quantizer: name (in ``weight_quantizers``) of its quantizer.
      step_ratio_start, step_ratio_stop, step_ratio_num: the ratio grid
        ``linspace(start, stop, num)``.
      qat_bits: weight bit widths at which a QAT checkpoint's own quantizers re-quantise its
        float shadow weights (activations as trained).
      qat_step_ratio: also sweep a QAT checkpoint's learned weight steps/clips over the ratio
        grid (at its trained bit widths).
      nested_bits: widths ``r`` at which every checkpoint is evaluated twice, weight-only
        (:mod:`kure_jax.evaluation.nested_sweep`): its float kernels re-quantised to
        asymmetric min-max codes of ``r`` bits, and the top ``r`` bits of their
        ``nested_nest_bits``-bit codes (Matryoshka slicing). ``()`` (the default) skips it.
      nested_nest_bits: the width ``c`` of the codes that are sliced (8: int8).
      nested_per_channel: one min-max range per output channel (as the ``"matryoshka"`` QAT
        quantizer) instead of one per tensor.
      histogram_layers: how many quantised layers get a weight histogram.
      plots: write the PNG plots.
      runtime_schemes: real integer runtimes to run the model in (``runtimes.schemes``),
        names such as ``"litert/int8"`` or ``"ort/int8_per_channel_minmax"`` (see
        :mod:`kure_jax.evaluation.runtime_schemes`); empty (the default) turns them off.
      runtime_batch_size: the fixed batch size of the LiteRT models
        (``runtimes.litert_batch_size``).

    Raises:
      ValueError: on construction for any invalid value, naming the config key.
    """

    layers: str = "paper"
    eval_batch_size: int = 1000
    map_chunk: int = 1
    weight_bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    weight_quantizers: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: dict(_DEFAULT_QUANTIZERS)
    )
    stochastic_seeds: int = 4
    wa_pairs: tuple[tuple[int, int], ...] = ((8, 8), (6, 6), (5, 5), (4, 4), (3, 3))
    wa_weight_quantizer: str = "max"
    act_clip: str = "mse"
    act_percentile: float = 99.99
    calibration_images: int = 512
    calibration_seed: int = 0
    step_ratio_bits: tuple[int, ...] = (4, 3)
    step_ratio_quantizer: str = "max"
    step_ratio_start: float = 0.7
    step_ratio_stop: float = 1.3
    step_ratio_num: int = 61
    qat_bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    qat_step_ratio: bool = True
    nested_bits: tuple[int, ...] = ()
    nested_nest_bits: int = 8
    nested_per_channel: bool = True
    histogram_layers: int = 3
    plots: bool = True
    runtime_schemes: tuple[str, ...] = ()
    runtime_batch_size: int = 100

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if self.layers not in LAYER_SELECTIONS:
            raise ValueError(
                f"sweep key 'layers' must be one of {LAYER_SELECTIONS}; got {self.layers!r}."
            )
        for name, low in (("eval_batch_size", 1), ("map_chunk", 1), ("stochastic_seeds", 1),
                          ("calibration_images", 1), ("calibration_seed", 0),
                          ("step_ratio_num", 1), ("histogram_layers", 0),
                          ("runtime_batch_size", 1)):
            set_(name, _integer(getattr(self, name), name, low))
        for name in ("weight_bits", "step_ratio_bits", "qat_bits", "nested_bits"):
            set_(name, _bits_tuple(getattr(self, name), name))
        set_("nested_nest_bits", _one_bits(self.nested_nest_bits, "nested.nest_bits"))
        if any(b > self.nested_nest_bits for b in self.nested_bits):
            raise ValueError(
                f"sweep key 'nested.bits' {self.nested_bits} must not exceed 'nested.nest_bits' "
                f"({self.nested_nest_bits}): the slices are the top bits of those codes."
            )
        set_("wa_pairs", _pairs(self.wa_pairs))
        set_("runtime_schemes", _runtime_schemes(self.runtime_schemes))
        set_("weight_quantizers", _quantizers(self.weight_quantizers))
        for name in ("wa_weight_quantizer", "step_ratio_quantizer"):
            if getattr(self, name) not in self.weight_quantizers:
                raise ValueError(
                    f"sweep key {_key_of(name)!r} must name one of weight.quantizers "
                    f"{sorted(self.weight_quantizers)}; got {getattr(self, name)!r}."
                )
        if self.weight_quantizers[self.step_ratio_quantizer].get("rounding") == "stochastic":
            raise ValueError(
                "sweep key 'step_ratio.quantizer' must name a deterministic quantizer; "
                f"{self.step_ratio_quantizer!r} uses stochastic rounding."
            )
        if self.act_clip not in CLIP_METHODS:
            raise ValueError(
                f"sweep key 'weight_act.act_clip' must be one of {CLIP_METHODS}; "
                f"got {self.act_clip!r}."
            )
        for name in ("act_percentile", "step_ratio_start", "step_ratio_stop"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"sweep key {_key_of(name)!r} must be a finite number > 0; got {value!r}."
                )
            set_(name, float(value))
        if self.act_percentile > 100:
            raise ValueError(
                "sweep key 'weight_act.act_percentile' must be in (0, 100]; "
                f"got {self.act_percentile}."
            )
        if self.step_ratio_stop < self.step_ratio_start:
            raise ValueError(
                f"sweep keys 'step_ratio.start' ({self.step_ratio_start}) and 'step_ratio.stop' "
                f"({self.step_ratio_stop}) must satisfy start <= stop."
            )
        for name in ("qat_step_ratio", "nested_per_channel", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"sweep key {_key_of(name)!r} must be True or False; "
                    f"got {getattr(self, name)!r}."
                )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SweepSpec:
        """Builds a spec from a sweep config (a ``ConfigDict`` or nested mapping).

        Raises:
          ValueError: for an unknown key or section (the message lists the allowed ones) or
            any invalid value.
        """
        config = _as_dict(config)
        fields: dict[str, Any] = {}
        for key, value in config.items():
            if key in _SCHEMA and key is not None:
                if not isinstance(value, Mapping):
                    raise ValueError(f"sweep key {key!r} must be a section (a ConfigDict).")
                allowed = _SCHEMA[key]
                for sub, sub_value in value.items():
                    if sub not in allowed:
                        raise ValueError(
                            f"unknown sweep key '{key}.{sub}'; allowed keys of {key!r}: "
                            f"{', '.join(allowed)}."
                        )
                    fields[allowed[sub]] = sub_value
            elif key in _SCHEMA[None]:
                fields[_SCHEMA[None][key]] = value
            else:
                allowed = [*_SCHEMA[None], *(k for k in _SCHEMA if k is not None)]
                raise ValueError(f"unknown sweep key {key!r}; allowed keys: {', '.join(allowed)}.")
        return cls(**fields)

    def to_config_dict(self) -> dict[str, Any]:
        """The spec as a nested, JSON-ready dict with the config's keys."""
        out: dict[str, Any] = {}
        for section, keys in _SCHEMA.items():
            target = out if section is None else out.setdefault(section, {})
            for key, field in keys.items():
                value = getattr(self, field)
                if isinstance(value, Mapping):
                    value = {k: dict(v) for k, v in value.items()}
                elif isinstance(value, tuple):
                    value = [list(v) if isinstance(v, tuple) else v for v in value]
                target[key] = value
        return out

    def weight_policy(self, name: str, bits: int) -> QuantPolicy:
        """The ``QuantPolicy`` of weight quantizer ``name`` at ``bits``.

        Raises:
          ValueError: for a name not in ``weight_quantizers`` or invalid bits.
        """
        if name not in self.weight_quantizers:
            raise ValueError(
                f"unknown weight quantizer {name!r}; known: {sorted(self.weight_quantizers)}."
            )
        return QuantPolicy(bits=bits, **self.weight_quantizers[name])

    def step_ratios(self) -> np.ndarray:
        """The ratio grid, float32 ``(step_ratio_num,)``."""
        return np.linspace(
            self.step_ratio_start, self.step_ratio_stop, self.step_ratio_num, dtype=np.float32
        )


def _key_of(field: str) -> str:
    for section, keys in _SCHEMA.items():
        for key, name in keys.items():
            if name == field:
                return key if section is None else f"{section}.{key}"
    return field


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"a sweep config must be a ConfigDict or mapping; got {type(config)}.")
    return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any, field: str, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"sweep key {_key_of(field)!r} must be an int >= {low}; got {value!r}.")
    return int(value)


def _one_bits(value: Any, key: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not (
        MIN_BITS <= value <= MAX_BITS
    ):
        raise ValueError(
            f"sweep key {key!r} needs bit widths that are ints in [{MIN_BITS}, {MAX_BITS}]; "
            f"got {value!r}."
        )
    return int(value)


def _bits_tuple(values: Any, field: str) -> tuple[int, ...]:
    key = _key_of(field)
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"sweep key {key!r} must be a tuple of bit widths; got {values!r}.")
    return tuple(_one_bits(v, key) for v in values)


def _pairs(values: Any) -> tuple[tuple[int, int], ...]:
    key = "weight_act.pairs"
    pairs = []
    for pair in values:
        if isinstance(pair, str | bytes) or len(pair) != 2:
            raise ValueError(
                f"sweep key {key!r} must hold (weight_bits, act_bits) pairs; got {pair!r}."
            )
        pairs.append((_one_bits(pair[0], key), _one_bits(pair[1], key)))
    return tuple(pairs)


def _runtime_schemes(values: Any) -> tuple[str, ...]:
    from kure_jax.evaluation.runtime_schemes import parse_scheme

    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError("sweep key 'runtimes.schemes' must be a tuple of names such as "
                         f"('litert/int8', 'ort/int8_per_channel_minmax'); got {values!r}.")
    names = tuple(parse_scheme(v).name for v in values)
    if len(set(names)) != len(names):
        raise ValueError(f"sweep key 'runtimes.schemes' lists a name twice: {list(names)}.")
    return names


def _quantizers(value: Any) -> dict[str, dict[str, Any]]:
    key = "weight.quantizers"
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"sweep key {key!r} must map names to QuantPolicy fields, e.g. "
            f"{{'max': {{}}, 'per_channel': {{'axis': -1}}}}; got {value!r}."
        )
    out = {}
    rank = {name: i for i, name in enumerate(_QUANTIZER_ORDER)}
    for name, fields in sorted(value.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        fields = _as_dict(fields)
        unknown = sorted(set(fields) - set(_POLICY_FIELDS))
        if unknown:
            raise ValueError(
                f"sweep key '{key}.{name}' has unknown QuantPolicy field(s) {unknown}; allowed: "
                f"{', '.join(_POLICY_FIELDS)} (bits come from the sweep's bit lists)."
            )
        if isinstance(fields.get("axis"), list):
            fields["axis"] = tuple(fields["axis"])
        try:
            QuantPolicy(bits=MIN_BITS, **fields)
        except ValueError as err:
            raise ValueError(f"sweep key '{key}.{name}': {err}") from None
        out[str(name)] = fields
    return out


def load_sweep(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Loads ``get_config()`` from a sweep file and applies ``KEY=VALUE`` overrides.

    Args:
      path: a Python file defining ``get_config()`` (e.g. ``configs/sweeps/default.py``).
      overrides: strings like ``"weight.bits=(4, 2)"`` or ``"layers=kernels"``; values are
        Python literals (``ast.literal_eval``), anything else is taken as a string.

    Returns:
      The validated :class:`SweepSpec`.

    Raises:
      ValueError: for a missing or broken file, a malformed override, an unknown key or an
        invalid value (one line each).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {path} does not exist.")
    try:
        config = runpy.run_path(str(path))["get_config"]()
    except KeyError:
        raise ValueError(f"sweep file {path} defines no get_config().") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        message = f"sweep file {path} failed to load: {type(err).__name__}: {first}"
        raise ValueError(message) from err
    config = _as_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"a sweep override must look like KEY=VALUE; got {item!r}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"sweep override {key!r}: {part!r} is not a section.")
        node[leaf] = value
    return SweepSpec.from_config(config)
