"""ONNX Runtime backend: JAX -> ONNX (jax2onnx) -> ``quantize_static`` (QDQ) -> ORT session.

The JAX function is traced to a jaxpr and converted by ``jax2onnx.to_onnx`` with a symbolic
batch dimension ``"B"``; ONNX Runtime's own tooling (``quant_pre_process``, then
``quantize_static`` in QDQ format) quantises it from calibration images, and an
``InferenceSession`` on the CPU execution provider runs it. Schemes (:class:`OrtScheme`):

* float (``weight_bits=None``): the exported graph as is (logits match JAX to ~1e-5);
* int8 weights, per tensor or per output channel, symmetric on ``[-127, 127]``
  (ORT's ``WeightSymmetric`` default);
* 4-bit weights (``QuantType.QInt4``, symmetric ``[-7, 7]``), int8 activations;
* activations int8 per tensor, calibrated by ``"minmax"``, ``"entropy"`` or ``"percentile"``
  (ORT's ``CalibrationMethod``), *asymmetric* by default (a zero point, ORT's default);
  ``symmetric_activations=True`` sets ``ActivationSymmetric``.

ORT quantises every tensor between supported ops (Conv, Gemm, the BatchNorm arithmetic,
pooling, ...), not only the inputs of conv/dense layers as kure_jax's emulation does.

Two repairs of the jax2onnx graph, both semantics-preserving (checked by the float logits):

* ``flax.linen.max_pool`` becomes ``lax.reduce_window_max`` over NHWC, which jax2onnx's lax
  plugin lowers to a 4-D ``MaxPool`` that ORT refuses ("Unsupported pooling size"), and its
  Linen plugin, which emits a 2-D ``MaxPool``, only accepts keyword arguments (``nn.max_pool(x,
  (2, 2))`` raises a TypeError). :func:`export_onnx` therefore re-traces the jaxpr and routes
  every plain NHWC window max through ``nn.max_pool`` with keywords.
* jax2onnx writes ``Gemm(A, B, C=0-d zero, beta=0)`` for a matmul; ORT's per-channel
  quantizer fails on the 0-d bias ("array is 0-dimensional"), so zero ``C`` inputs are dropped.

Intended call from an eval sweep family ``runtimes`` (not wired in yet); the float export is
shared by all schemes::

    from kure_jax.deploy import onnx_runtime, linen_inference
    graph = onnx_runtime.export_onnx(linen_inference(model, variables), (28, 28, 1))
    results = [onnx_runtime.measure(graph, calib_images, test_images, test_labels, scheme=s)
               for s in onnx_runtime.SCHEMES]
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kure_jax.deploy.runtime import ApplyFn, RuntimeResult, accuracy, batches, failure, require

__all__ = ["CALIBRATIONS", "SCHEMES", "OrtScheme", "export_onnx", "initializer_types",
           "measure", "quantize_static", "run"]

RUNTIME = "onnxruntime"
CALIBRATIONS: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrtScheme:
    """One ONNX Runtime quantisation scheme.

    Attributes:
      weight_bits: 8 (QInt8), 4 (QInt4) or ``None`` for the float graph.
      per_channel: per-output-channel weight scales (else per tensor).
      calibration: activation range method, one of :data:`CALIBRATIONS`.
      symmetric_activations: symmetric int8 activations (zero point 0) instead of ORT's
        asymmetric default.

    Raises:
      ValueError: for an unsupported field value.
    """

    weight_bits: int | None = 8
    per_channel: bool = True
    calibration: str = "minmax"
    symmetric_activations: bool = False

    def __post_init__(self) -> None:
        if self.weight_bits not in (None, 4, 8):
            raise ValueError(f"weight_bits must be 8, 4 or None; got {self.weight_bits!r}.")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}; "
                             f"got {self.calibration!r}.")

    @property
    def name(self) -> str:
        """A label such as ``"w8a8 per-channel minmax"`` or ``"float"``."""
        if self.weight_bits is None:
            return "float"
        parts = [f"w{self.weight_bits}a8", "per-channel" if self.per_channel else "per-tensor",
                 self.calibration]
        if self.symmetric_activations:
            parts.append("sym-act")
        return " ".join(parts)


SCHEMES: tuple[OrtScheme, ...] = (
    OrtScheme(weight_bits=None),
    OrtScheme(per_channel=False),
    OrtScheme(),
    OrtScheme(calibration="entropy"),
    OrtScheme(calibration="percentile"),
    OrtScheme(weight_bits=4),
)


def _onnx() -> Any:
    return require("onnx", "onnx")


def _is_plain_nhwc_window_max(params: dict[str, Any]) -> bool:
    dims, strides = params["window_dimensions"], params["window_strides"]
    return (len(dims) == 4 and dims[0] == dims[-1] == 1 and strides[0] == strides[-1] == 1
            and all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"]))
            and all(lo == hi == 0 for lo, hi in params["padding"]))


def _evaluate_rewritten(closed: Any, *args: Any) -> list[Any]:
    """Evaluates a closed jaxpr like ``jax.core.eval_jaxpr``, but NHWC window maxima call
    ``nn.max_pool`` with keywords (see the module docstring) and nested jit calls are inlined
    so that their window maxima are rewritten too."""
    from jax.extend import core as jcore

    env: dict[Any, Any] = {}
    read = lambda atom: atom.val if isinstance(atom, jcore.Literal) else env[atom]
    env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(closed.jaxpr.invars, args, strict=True))
    for eqn in closed.jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("jit", "pjit"):
            outputs = _evaluate_rewritten(eqn.params["jaxpr"], *inputs)
        elif name == "reduce_window_max" and _is_plain_nhwc_window_max(eqn.params):
            outputs = [nn.max_pool(inputs[0],
                                   window_shape=tuple(eqn.params["window_dimensions"][1:3]),
                                   strides=tuple(eqn.params["window_strides"][1:3]),
                                   padding="VALID")]
        else:
            outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        env.update(zip(eqn.outvars, outputs, strict=True))
    return [read(v) for v in closed.jaxpr.outvars]


def _drop_zero_gemm_bias(model: Any) -> None:
    onnx = _onnx()
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if not np.any(numpy_helper.to_array(inits[node.input[2]])):
            del node.input[2]
            for attr in node.attribute:
                if attr.name == "beta":
                    attr.CopyFrom(onnx.helper.make_attribute("beta", 1.0))
    used = {name for node in model.graph.node for name in node.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)


def export_onnx(apply_fn: ApplyFn, image_shape: Sequence[int], *, opset: int = 21) -> Any:
    """The float ONNX graph of ``apply_fn`` with a symbolic batch dimension ``"B"``.

    Args:
      apply_fn: ``images (B, H, W, C) float32 -> logits`` in inference mode.
      image_shape: ``(H, W, C)``.
      opset: ONNX opset (21 has INT4 QDQ, which 4-bit weights need).

    Returns:
      An ``onnx.ModelProto`` (input NHWC float32, output the logits).

    Raises:
      ImportError: if ``jax2onnx`` or ``onnx`` is missing.
      Exception: jax2onnx's error for a primitive it cannot convert.
    """
    to_onnx = require("jax2onnx", "jax2onnx").to_onnx
    _onnx()
    shape = jax.export.symbolic_shape(", ".join(["B", *map(str, image_shape)]))
    closed = jax.make_jaxpr(apply_fn)(jax.ShapeDtypeStruct(shape, jnp.float32))
    model = to_onnx(lambda images: _evaluate_rewritten(closed, images)[0],
                    [("B", *image_shape)], opset=opset, return_mode="proto")
    _drop_zero_gemm_bias(model)
    return model


def _session(model: Any) -> Any:
    ort = require("onnxruntime", "onnxruntime")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(model: Any, images: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """Float32 logits ``(N, classes)`` of an ONNX model on ``images (N, H, W, C)``.

    Raises:
      ImportError: if ``onnxruntime`` is missing.
    """
    session = _session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([np.asarray(session.run(None, {name: chunk})[0], np.float32)
                           for chunk in batches(images, batch_size)])


def quantize_static(
    model: Any, calibration_images: np.ndarray, scheme: OrtScheme, *, batch_size: int = 32
) -> Any:
    """``quantize_static`` (QDQ) of a float ONNX model under ``scheme``.

    Args:
      model: the float ``onnx.ModelProto`` of :func:`export_onnx`.
      calibration_images: ``(N, H, W, C)`` float32 images, fed in batches of ``batch_size``
        (the remainder beyond the last full batch is not used).
      scheme: an :class:`OrtScheme` with ``weight_bits`` set.

    Returns:
      The quantised ``onnx.ModelProto``.

    Raises:
      ValueError: for a float scheme.
      ImportError: if ``onnxruntime``/``onnx`` is missing.
      Exception: ORT's error for a graph it cannot quantise.
    """
    if scheme.weight_bits is None:
        raise ValueError("quantize_static needs a scheme with weight_bits 8 or 4.")
    onnx = _onnx()
    quantization = require("onnxruntime.quantization", "onnxruntime")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = model.graph.input[0].name
    images = np.asarray(calibration_images, np.float32)
    # Equal batches only: ORT's histogram calibrators (entropy, percentile) stack the batches
    # and fail on a shorter last one ("inhomogeneous shape").
    full = images.shape[0] - images.shape[0] % batch_size
    images = images[:full] if full else images
    feeds = iter([{name: chunk} for chunk in batches(images, min(batch_size, len(images)))])

    class _Reader(quantization.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    methods = {"minmax": quantization.CalibrationMethod.MinMax,
               "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    weight_type = quantization.QuantType.QInt8 if scheme.weight_bits == 8 else (
        quantization.QuantType.QInt4)
    with tempfile.TemporaryDirectory() as tmp:
        raw, pre, out = (pathlib.Path(tmp) / f for f in ("raw.onnx", "pre.onnx", "q.onnx"))
        onnx.save(model, raw)
        # Shape inference and constant folding: the transposed kernels become initializers,
        # which quantize_static needs in order to quantise them as weights.
        quant_pre_process(str(raw), str(pre))
        quantization.quantize_static(
            str(pre), str(out), _Reader(), quant_format=quantization.QuantFormat.QDQ,
            per_channel=scheme.per_channel, weight_type=weight_type,
            activation_type=quantization.QuantType.QInt8,
            calibrate_method=methods[scheme.calibration],
            extra_options={"ActivationSymmetric": scheme.symmetric_activations},
        )
        return onnx.load(out)


def initializer_types(model: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, ONNX data type name, dims)`` of every initializer, e.g.
    ``("conv_rhs_oihw_1_quantized", "INT8", (16, 8, 3, 3))``.

    Raises:
      ImportError: if ``onnx`` is missing.
    """
    onnx = _onnx()
    return [(i.name, onnx.TensorProto.DataType.Name(i.data_type), tuple(i.dims))
            for i in model.graph.initializer]


def measure(
    model: ApplyFn | Any,
    calibration_images: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    scheme: OrtScheme = OrtScheme(),
) -> RuntimeResult:
    """Quantises (per ``scheme``) and runs a model in ONNX Runtime; top-1 accuracy.

    Args:
      model: ``images -> logits`` in inference mode, or the float ``onnx.ModelProto`` of
        :func:`export_onnx` (export once, evaluate many schemes).
      calibration_images: ``(N, H, W, C)`` float32 calibration images (training data).
      images: ``(M, H, W, C)`` float32 eval images.
      labels: ``(M,)`` int labels.
      scheme: an :class:`OrtScheme`.

    Returns:
      A :class:`RuntimeResult` named ``scheme.name``; an export or quantisation the toolchain
      refuses gives ``accuracy=None`` and the reason.

    Raises:
      ImportError: if ``jax2onnx``, ``onnx`` or ``onnxruntime`` is missing.
    """
    onnx = _onnx()
    require("onnxruntime", "onnxruntime")
    images = np.asarray(images, np.float32)
    try:
        graph = model if isinstance(model, onnx.ModelProto) else export_onnx(
            model, images.shape[1:])
        if scheme.weight_bits is not None:
            graph = quantize_static(graph, calibration_images, scheme)
        logits = run(graph, images)
    except ImportError:
        raise
    except Exception as err:  # the toolchain's refusal is a result, not a crash
        return failure(RUNTIME, scheme.name, err)
    return RuntimeResult(RUNTIME, scheme.name, accuracy(logits, labels),
                         model_bytes=graph.ByteSize(), logits=logits)
