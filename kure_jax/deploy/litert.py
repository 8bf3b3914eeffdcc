"""LiteRT (TensorFlow Lite) backend: jax2tf -> TFLite post-training quantisation -> interpreter.

The JAX function is lowered with ``jax2tf.convert`` (StableHLO inside a ``tf.function``),
converted by ``tf.lite.TFLiteConverter`` and run in the ``ai_edge_litert`` interpreter, the
runtime that ships on devices. Schemes (:data:`SCHEMES`):

* ``"float"``: no quantisation (checks the conversion: logits match JAX to ~1e-5).
* ``"int8"``: full-integer PTQ with a representative dataset: int8 weights, symmetric per
  output channel on ``[-127, 127]`` (conv and fully-connected kernels), int8 activations
  per tensor *asymmetric* (a zero point), int32 biases; builtin int8 kernels only
  (``TFLITE_BUILTINS_INT8``: the conversion fails rather than fall back to float). The model's
  interface stays float32 (a QUANTIZE op after the input, DEQUANTIZE before the output).
* ``"16x8"``: int16 activations, int8 weights
  (``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``).

The model is converted with a fixed batch size (``batch_size``): a polymorphic batch makes
jax2tf emit shape arithmetic (BROADCAST_TO, UNSORTED_SEGMENT_PROD, CAST) that 16x8 cannot
quantise; the last eval batch is padded.

Intended call from an eval sweep family ``runtimes`` (not wired in yet)::

    from kure_jax.deploy import litert, linen_inference
    fn = linen_inference(model, variables)
    result = litert.measure(fn, calib_images, test_images, test_labels, scheme="int8")
    row = result.row()   # {"runtime", "scheme", "accuracy", "error", "model_bytes"}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kure_jax.deploy.runtime import ApplyFn, RuntimeResult, accuracy, batches, failure, require

__all__ = ["SCHEMES", "convert", "measure", "run", "tensor_details"]

SCHEMES: tuple[str, ...] = ("float", "int8", "16x8")
RUNTIME = "litert"


def _tf() -> Any:
    return require("tensorflow", "tensorflow-cpu")


def convert(
    apply_fn: ApplyFn,
    image_shape: Sequence[int],
    *,
    scheme: str = "int8",
    calibration_images: np.ndarray | None = None,
    batch_size: int = 100,
) -> bytes:
    """Converts ``apply_fn`` to a TFLite flatbuffer.

    Args:
      apply_fn: ``images (B, H, W, C) float32 -> logits`` in inference mode.
      image_shape: ``(H, W, C)`` of one image.
      scheme: one of :data:`SCHEMES`.
      calibration_images: ``(N, H, W, C)`` float32 images for the representative dataset
        (required unless ``scheme="float"``); fed in full batches of ``batch_size`` (a set
        smaller than one batch is padded with zero images).
      batch_size: the model's fixed batch size.

    Returns:
      The serialised model.

    Raises:
      ValueError: for an unknown scheme or missing calibration images.
      ImportError: if TensorFlow is missing.
      Exception: whatever the converter raises for a graph it refuses (``measure`` turns it
        into a failed result).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}.")
    if scheme != "float" and (calibration_images is None or len(calibration_images) == 0):
        raise ValueError(f"scheme {scheme!r} needs calibration_images.")
    tf = _tf()
    from jax.experimental import jax2tf

    spec = tf.TensorSpec([batch_size, *image_shape], tf.float32)
    tf_fn = tf.function(jax2tf.convert(apply_fn, with_gradient=False), autograph=False,
                        input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf_fn.get_concrete_function()], tf_fn)
    if scheme != "float":
        images = np.asarray(calibration_images, np.float32)
        full = images.shape[0] - images.shape[0] % batch_size
        # Only full batches (zero padding would add all-black images to the statistics),
        # unless there is not even one.
        calib = images[:full] if full else images

        def representative() -> Any:
            for batch in batches(calib, batch_size, pad=True):
                yield [batch]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        ops = (tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if scheme == "int8" else
               tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8)
        converter.target_spec.supported_ops = [ops]
    return converter.convert()


def _interpreter(model: bytes) -> Any:
    module = require("ai_edge_litert.interpreter", "ai-edge-litert")
    interpreter = module.Interpreter(model_content=model)
    interpreter.allocate_tensors()
    return interpreter


def run(model: bytes, images: np.ndarray) -> np.ndarray:
    """Float32 logits ``(N, classes)`` of a converted model on ``images (N, H, W, C)``.

    Batches of the model's fixed batch size; the last one is padded and the padding dropped.

    Raises:
      ImportError: if ``ai-edge-litert`` is missing.
    """
    interpreter = _interpreter(model)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    batch = int(inp["shape"][0])
    outputs = []
    for chunk in batches(images, batch, pad=True):
        interpreter.set_tensor(inp["index"], chunk.astype(inp["dtype"]))
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_tensor(out["index"]), np.float32))
    return np.concatenate(outputs)[: len(images)]


def tensor_details(model: bytes) -> list[dict[str, Any]]:
    """Every tensor of a converted model: ``{"name", "dtype" (NumPy dtype name), "shape",
    "scales" (float32 array, empty if not quantised), "zero_points", "quantized_dimension"}``.

    Raises:
      ImportError: if ``ai-edge-litert`` is missing.
    """
    details = []
    for d in _interpreter(model).get_tensor_details():
        q = d["quantization_parameters"]
        details.append({"name": d["name"], "dtype": np.dtype(d["dtype"]).name,
                        "shape": tuple(int(s) for s in d["shape"]), "scales": q["scales"],
                        "zero_points": q["zero_points"],
                        "quantized_dimension": int(q["quantized_dimension"])})
    return details


def measure(
    apply_fn: ApplyFn,
    calibration_images: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    scheme: str = "int8",
    batch_size: int = 100,
) -> RuntimeResult:
    """Converts, quantises (per ``scheme``) and runs ``apply_fn`` in LiteRT; top-1 accuracy.

    Args:
      apply_fn: ``images -> logits`` in inference mode (see ``linen_inference``).
      calibration_images: ``(N, H, W, C)`` float32 representative images (training data).
      images: ``(M, H, W, C)`` float32 eval images.
      labels: ``(M,)`` int labels.
      scheme: one of :data:`SCHEMES`.
      batch_size: the converted model's fixed batch size.

    Returns:
      A :class:`RuntimeResult`; a conversion the toolchain refuses gives ``accuracy=None``
      and the reason.

    Raises:
      ValueError: for an unknown scheme.
      ImportError: if ``tensorflow-cpu`` or ``ai-edge-litert`` is missing.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}.")
    _tf()
    require("ai_edge_litert.interpreter", "ai-edge-litert")
    images = np.asarray(images, np.float32)
    try:
        model = convert(apply_fn, images.shape[1:], scheme=scheme,
                        calibration_images=calibration_images, batch_size=batch_size)
        logits = run(model, images)
    except ImportError:
        raise
    except Exception as err:  # the toolchain's refusal is a result, not a crash
        return failure(RUNTIME, scheme, err)
    return RuntimeResult(RUNTIME, scheme, accuracy(logits, labels), model_bytes=len(model),
                         logits=logits)
