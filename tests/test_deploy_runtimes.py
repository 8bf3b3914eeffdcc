"""Real runtimes (kure_jax.deploy.litert / onnx_runtime) cross-checked against kure_jax's emulation.

One small CNN (SmallCNN with BatchNorm, features (8, 16), hidden 32) is trained on the shipped
digits once per module. Our emulation of "W8A8 per-channel" is ``quantize_params`` with
``QuantPolicy(bits=8, axis=-1)`` (symmetric, [-127, 127]) on every conv/dense kernel plus static
int8 inputs of every conv/dense layer calibrated by max (``evaluation.calibration``).

Where the runtimes' schemes differ from it, on purpose (tolerance stays 1 point):

* activations: both runtimes use *asymmetric* int8 (a zero point) per tensor; we use unsigned
  codes 0..255 for non-negative inputs and symmetric signed ones otherwise;
* what is quantised: the runtimes quantise every tensor between ops (BatchNorm arithmetic,
  pool outputs, logits) and the biases to int32; we quantise only conv/dense inputs and weights;
* weights: LiteRT (and ORT per-channel) quantise the kernel after folding BatchNorm's scale
  where they fold it; per-output-channel symmetric steps are invariant to that scaling.
"""

import time

import jax
import numpy as np
import pytest
from _training_helpers import train_small_cnn

from kure_jax import QuantPolicy, quantize_params
from kure_jax.data.mnist5k import load_mnist5k
from kure_jax.deploy import litert, onnx_runtime
from kure_jax.deploy.runtime import RuntimeResult, linen_inference, require
from kure_jax.evaluation.calibration import activation_quantized, calibrate_activations

LAYERS = ("stem_conv", "conv1", "hidden", "head")
ONE_POINT = 0.01


@pytest.fixture(scope="module")
def trained():
    start = time.perf_counter()
    train, test = load_mnist5k("train"), load_mnist5k("test")
    model, variables = train_small_cnn(train, steps=400)
    fn = linen_inference(model, variables)
    logits = np.asarray(jax.jit(fn)(test.images))
    calib = train.images[:256]
    onnx_float = onnx_runtime.export_onnx(fn, test.images.shape[1:])
    print(f"\n[fixture] trained + ONNX export in {time.perf_counter() - start:.1f}s")
    return {"model": model, "variables": variables, "fn": fn, "test": test, "calib": calib,
            "logits": logits, "accuracy": float(np.mean(logits.argmax(-1) == test.labels)),
            "onnx": onnx_float, "results": {}}


def _emulated_accuracy(trained, policy):
    model, variables, test = trained["model"], trained["variables"], trained["test"]
    apply_fn = lambda v, x: model.apply(v, x, train=False)
    cal = calibrate_activations(apply_fn, variables, [trained["calib"]], layers=LAYERS,
                                bits=[8], clip="max")[8]
    quantized = {**variables, "params": quantize_params(variables["params"], policy)}
    forward = jax.jit(activation_quantized(apply_fn, bits=8, signed=cal.signed))
    logits = np.asarray(forward(quantized, cal.steps, test.images))
    return float(np.mean(logits.argmax(-1) == test.labels))


def _litert(trained, scheme):
    key = ("litert", scheme)
    if key not in trained["results"]:
        t = trained["test"]
        trained["results"][key] = litert.measure(trained["fn"], trained["calib"], t.images,
                                                  t.labels, scheme=scheme, batch_size=64)
    return trained["results"][key]


def _ort(trained, scheme):
    key = ("onnxruntime", scheme)
    if key not in trained["results"]:
        t = trained["test"]
        trained["results"][key] = onnx_runtime.measure(trained["onnx"], trained["calib"],
                                                        t.images, t.labels, scheme=scheme)
    return trained["results"][key]


def _kernels(trained):
    return {name: np.asarray(leaf) for name, leaf in
            (("/".join(str(k.key) for k in path), leaf) for path, leaf in
             jax.tree_util.tree_leaves_with_path(trained["variables"]["params"]))
            if name.endswith("kernel")}


@pytest.mark.slow
def test_the_float_exports_give_the_jax_logits(trained):
    for result in (_litert(trained, "float"), _ort(trained, onnx_runtime.OrtScheme(
            weight_bits=None))):
        assert result.ok, result.error
        np.testing.assert_allclose(result.logits, trained["logits"], atol=1e-4, rtol=0)
        assert result.accuracy == pytest.approx(trained["accuracy"])


@pytest.mark.slow
def test_litert_int8_graph_holds_per_channel_int8_kernels(trained):
    result = _litert(trained, "int8")
    assert result.ok, result.error
    model = litert.convert(trained["fn"], (28, 28, 1), scheme="int8",
                           calibration_images=trained["calib"], batch_size=64)
    int8 = [d for d in litert.tensor_details(model) if d["dtype"] == "int8"]
    for name, kernel in _kernels(trained).items():
        # TFLite stores conv kernels OHWI (depthwise 1HWO for the 1-channel stem) and dense
        # kernels (out, in): match by element count and one symmetric step per output channel.
        matches = [d for d in int8 if np.prod(d["shape"]) == kernel.size
                   and d["scales"].size == kernel.shape[-1]]
        assert matches, f"no per-channel int8 tensor for {name} {kernel.shape}"
        assert not np.any(matches[0]["zero_points"]), name
    assert len(model) < 0.5 * _litert(trained, "float").model_bytes


@pytest.mark.slow
def test_onnx_quantized_graphs_hold_int8_and_int4_kernels(trained):
    kernels = _kernels(trained)
    for bits, onnx_type in ((8, "INT8"), (4, "INT4")):
        graph = onnx_runtime.quantize_static(trained["onnx"], trained["calib"],
                                      onnx_runtime.OrtScheme(weight_bits=bits))
        sizes = {int(np.prod(dims)) for _, dtype, dims in onnx_runtime.initializer_types(graph)
                 if dtype == onnx_type and len(dims) >= 2}
        for name, kernel in kernels.items():
            assert kernel.size in sizes, f"{name} is not stored as {onnx_type}"


@pytest.mark.slow
def test_int8_per_channel_accuracy_matches_our_emulation(trained):
    ours = _emulated_accuracy(trained, QuantPolicy(bits=8, axis=-1))
    lite = _litert(trained, "int8")
    ort = _ort(trained, onnx_runtime.OrtScheme())
    print(f"\n[accuracy] JAX float {trained['accuracy']:.3f}, ours W8A8 per-channel {ours:.3f}, "
          f"LiteRT int8 {lite.accuracy}, ORT w8a8 per-channel {ort.accuracy}")
    for result in (lite, ort):
        assert result.ok, result.error
        assert abs(result.accuracy - ours) <= ONE_POINT, result
    assert abs(ours - trained["accuracy"]) <= ONE_POINT


@pytest.mark.slow
def test_ort_per_tensor_and_symmetric_activations_match_our_emulation(trained):
    ours = _emulated_accuracy(trained, QuantPolicy(bits=8))
    per_tensor = _ort(trained, onnx_runtime.OrtScheme(per_channel=False))
    # ActivationSymmetric: ORT's activations without a zero point, closer to our scheme.
    symmetric = _ort(trained, onnx_runtime.OrtScheme(symmetric_activations=True))
    print(f"\n[accuracy] ours W8A8 per-tensor {ours:.3f}, ORT per-tensor {per_tensor.accuracy}, "
          f"ORT per-channel symmetric activations {symmetric.accuracy}")
    for result in (per_tensor, symmetric):
        assert result.ok, result.error
        assert abs(result.accuracy - ours) <= ONE_POINT, result


@pytest.mark.slow
def test_every_ort_calibrator_and_int4_weights_run(trained):
    rows = {}
    for scheme in onnx_runtime.SCHEMES:
        result = _ort(trained, scheme)
        assert result.ok, (scheme.name, result.error)
        rows[scheme.name] = result.accuracy
    # ORT's symmetric QInt4 is not our narrow [-7, 7] grid: it uses all codes [-8, 7] with the
    # step 2 max|w| / 15 (compute_scale_zp), so each channel's largest weight lands on 7.5 and
    # is clipped to 7. In QuantPolicy terms: full range and step_scale 7 / 7.5.
    ort_int4 = QuantPolicy(bits=4, axis=-1, narrow_range=False, step_scale=7 / 7.5)
    ours_w4 = _emulated_accuracy(trained, ort_int4)
    ours_w4_narrow = _emulated_accuracy(trained, QuantPolicy(bits=4, axis=-1))
    lite16 = _litert(trained, "16x8")
    print(f"\n[accuracy] ORT {rows}; ours W4A8 ORT grid {ours_w4:.3f}, narrow "
          f"{ours_w4_narrow:.3f}; LiteRT 16x8 {lite16.accuracy} ({lite16.error})")
    assert lite16.ok and abs(lite16.accuracy - trained["accuracy"]) <= ONE_POINT, lite16
    # Same 4-bit weight grid; the activation differences of the module docstring apply.
    assert abs(rows["w4a8 per-channel minmax"] - ours_w4) <= ONE_POINT
    for name, acc in rows.items():
        assert acc >= trained["accuracy"] - 0.03, name


def test_a_refused_conversion_is_a_failed_result_not_a_crash():
    x = np.random.default_rng(0).random((64, 4, 4, 1), dtype=np.float32)
    labels = np.zeros(64, np.int32)
    # No TFLite builtin and no ORT-valid ONNX lowering for an FFT.
    fft = lambda images: jax.numpy.fft.fft(images.reshape(images.shape[0], -1)).real[:, :3]
    for result in (litert.measure(fft, x, x, labels, scheme="int8", batch_size=32),
                   onnx_runtime.measure(fft, x, x, labels)):
        assert isinstance(result, RuntimeResult) and not result.ok
        assert result.accuracy is None and result.error and "\n" not in result.error


def test_a_missing_runtime_package_raises_one_import_error_naming_it(monkeypatch):
    import sys

    with pytest.raises(ImportError, match="pip install no-such-runtime"):
        require("no_such_runtime_module", "no-such-runtime")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    x = np.zeros((2, 4, 4, 1), np.float32)
    with pytest.raises(ImportError, match="pip install ai-edge-litert"):
        litert.measure(lambda im: im.reshape(2, -1), x, x, np.zeros(2, np.int32))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        onnx_runtime.measure(lambda im: im.reshape(2, -1), x, x, np.zeros(2, np.int32))
