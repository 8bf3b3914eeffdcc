"""The ``runtimes`` family of a sweep (kure_jax.evaluation.families.runtimes) end to end.

One small CNN with BatchNorm is trained once per module on the shipped digits and swept by
``evaluate_model`` with LiteRT and ONNX Runtime schemes. Each runtime point is checked against an
independent path: the same backend called directly through ``kure_jax.deploy`` on the model's
``linen_inference`` function (its accuracy must be the same number, its loss the cross-entropy of
that run's logits by optax). Refusals, missing packages, targets without a Linen module and bad
``runtimes`` keys are checked without converting anything.
"""

import json
import sys
import time

import optax
import pytest
from _training_helpers import train_small_cnn

from configs.sweeps import default, runtimes, tiny
from kure_jax.data.mnist5k import load_mnist5k
from kure_jax.deploy import litert, onnx_runtime
from kure_jax.deploy.runtime import linen_inference
from kure_jax.evaluation import Sweep, evaluate_model, validate_results
from kure_jax.evaluation.families.runtimes import RuntimePackageError

SCHEMES = ("litert/int8", "ort/int8_per_tensor_minmax")
CALIBRATION = 200
# Few points of the other sections: the runtimes are what is tested.
BASE = {"eval_batch_size": 500, "report": {"histogram_layers": 0, "plots": False}, "fp": {},
        "weight": {"bits": (8,), "quantizers": {"max": {}}},
        "weight_act": {"pairs": ((8, 8),), "act_clip": "max",
                       "calibration_images": CALIBRATION}}


@pytest.fixture(scope="module")
def trained():
    start = time.perf_counter()
    train, test = load_mnist5k("train"), load_mnist5k("test")
    model, variables = train_small_cnn(train, steps=300)
    print(f"\n[fixture] trained in {time.perf_counter() - start:.1f}s")
    return {"model": model, "variables": variables, "train": train, "test": test,
            "calib": train.images[:CALIBRATION]}


def _sweep(trained, out, schemes, *, module=True, wa_pairs=((8, 8),)):
    model, test = trained["model"], trained["test"]
    config = {**BASE, "runtimes": {"schemes": schemes}}
    config["weight_act"] = {**config["weight_act"], "pairs": wa_pairs}
    spec = Sweep.from_config(config)
    batches = [(test.images[i:i + 500], test.labels[i:i + 500]) for i in (0, 500)]
    return evaluate_model(lambda v, x: model.apply(v, x, train=False), trained["variables"],
                          batches, spec, out=out, name="cnn", progress=False,
                          module=model if module else None, calibration=trained["calib"])


@pytest.fixture(scope="module")
def swept(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtimes")
    start = time.perf_counter()
    data = _sweep(trained, out, SCHEMES)
    print(f"\n[fixture] sweep with {len(SCHEMES)} runtime schemes in "
          f"{time.perf_counter() - start:.1f}s")
    return data, out


def _runtime_points(data):
    return {p["quantizer"]: p for p in data["points"] if p["kind"] == "runtime"}


def test_runtime_points_equal_the_backends_called_directly(trained, swept):
    data, out = swept
    points = _runtime_points(data)
    assert list(points) == list(SCHEMES) and data["skipped"] == []
    test = trained["test"]
    fn = linen_inference(trained["model"], trained["variables"])
    direct = {
        "litert/int8": litert.measure(fn, trained["calib"], test.images, test.labels,
                                       scheme="int8", batch_size=100),
        "ort/int8_per_tensor_minmax": onnx_runtime.measure(
            fn, trained["calib"], test.images, test.labels,
            scheme=onnx_runtime.OrtScheme(per_channel=False)),
    }
    fp = next(p["accuracy"] for p in data["points"] if p["kind"] == "fp")
    print(f"\n[accuracy] fp {fp:.3f}, " + ", ".join(
        f"{k} {p['accuracy']:.3f}" for k, p in points.items()))
    for name, result in direct.items():
        point = points[name]
        assert result.ok, result.error
        assert point["accuracy"] == result.accuracy  # the same number, not merely close
        ce = optax.softmax_cross_entropy_with_integer_labels(result.logits, test.labels)
        assert point["loss"] == pytest.approx(float(ce.mean()), rel=1e-5)
        assert point["count"] == len(test.labels) == 1000
        assert (point["weight_bits"], point["act_bits"]) == (8, 8)
        # Same graph; the flatbuffer also stores the traced functions' names, which differ.
        assert point["policy"]["model_bytes"] == pytest.approx(result.model_bytes, rel=0.01)
        assert point["policy"]["calibration_images"] == CALIBRATION
        assert abs(point["accuracy"] - fp) <= 0.02  # int8 keeps a trained CNN's accuracy
    on_disk = json.loads((out / "results.json").read_text())
    validate_results(on_disk)
    assert _runtime_points(on_disk) == points


def test_the_report_has_the_runtimes_table_beside_our_emulation(swept):
    data, out = swept
    report = (out / "report.md").read_text()
    assert "### Real integer runtimes (LiteRT, ONNX Runtime)" in report
    points = _runtime_points(data)
    wa = next(p["accuracy"] for p in data["points"] if p["kind"] == "weight_act")
    fp = next(p["accuracy"] for p in data["points"] if p["kind"] == "fp")
    header = "| model | JAX FP | litert/int8 | ort/int8_per_tensor_minmax | ours W8A8 |"
    row = (f"| cnn | {100 * fp:.1f} | {100 * points['litert/int8']['accuracy']:.1f} | "
           f"{100 * points['ort/int8_per_tensor_minmax']['accuracy']:.1f} | {100 * wa:.1f} |")
    assert header in report and row in report, report
    assert "runtime" in (out / "results.csv").read_text()


def test_a_refused_conversion_is_a_failed_record_and_the_sweep_goes_on(trained, tmp_path,
                                                                     monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("converter refused: 'tfl.fancy_op' is not supported\nsecond line")

    monkeypatch.setattr(litert, "convert", refuse)
    monkeypatch.setattr(onnx_runtime, "export_onnx", refuse)
    data = _sweep(trained, tmp_path, ("litert/16x8", "ort/int8_per_channel_entropy",
                                      "ort/int4_per_channel_minmax"), wa_pairs=())
    assert data["complete"] and _runtime_points(data) == {}
    failed = data["skipped"]
    assert [(r["quantizer"], r["status"], r["weight_bits"], r["act_bits"]) for r in failed] == [
        ("litert/16x8", "failed", 8, 16), ("ort/int8_per_channel_entropy", "failed", 8, 8),
        ("ort/int4_per_channel_minmax", "failed", 4, 8)]
    for record in failed:
        assert record["reason"] == ("RuntimeError: converter refused: 'tfl.fancy_op' is not "
                                    "supported")
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    report = (tmp_path / "report.md").read_text()
    assert "## Failed points" in report and "## Skipped points" not in report
    fp = 100 * data["points"][0]["accuracy"]
    # Columns per (weight, act) bits, each followed by "ours" (no W/A points in this sweep).
    assert ("| model | JAX FP | litert/16x8 | ours W8A16 | ort/int8_per_channel_entropy | "
            "ours W8A8 | ort/int4_per_channel_minmax | ours W4A8 |") in report
    assert f"| cnn | {fp:.1f} | failed | – | failed | – | failed | – |" in report


def test_a_missing_runtime_package_is_one_error_naming_it(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimePackageError,
                       match=r"needs the package\(s\) ai-edge-litert, onnxruntime: pip install "
                             r"ai-edge-litert onnxruntime"):
        _sweep(trained, tmp_path, SCHEMES)
    assert not (tmp_path / "report.md").exists()  # raised while planning: nothing evaluated


def test_a_model_without_its_linen_module_gets_skipped_runtime_records(trained, tmp_path):
    data = _sweep(trained, tmp_path, ("litert/int8",), module=False, wa_pairs=())
    assert _runtime_points(data) == {}
    (record,) = data["skipped"]
    assert (record["kind"], record["quantizer"], "status" in record) == (
        "runtime", "litert/int8", False)
    assert "no Linen module" in record["reason"]
    assert "## Skipped points" in (tmp_path / "report.md").read_text()


def test_the_default_sweeps_have_no_runtimes_and_runtimes_py_turns_them_on():
    for module in (default, tiny):
        assert Sweep.from_config(module.get_config()).families["runtimes"].schemes == ()
    spec = Sweep.from_config(runtimes.get_config())
    assert spec.families["runtimes"].schemes == (
        "litert/int8", "litert/16x8", "ort/int8_per_tensor_minmax", "ort/int8_per_channel_minmax",
        "ort/int8_per_channel_entropy", "ort/int8_per_channel_percentile",
        "ort/int4_per_tensor_minmax", "ort/int4_per_channel_minmax")
    assert {(8, 8), (8, 16), (4, 8)} <= set(spec.families["weight_act"].pairs)  # "ours"
    assert Sweep.from_config(spec.to_dict()) == spec


@pytest.mark.parametrize("override, message", [
    ({"schemes": ("litert",)}, r"'litert' is not '<runtime>/<scheme>'"),
    ({"schemes": ("tvm/int8",)}, r"unknown runtime 'tvm' \(known: litert, ort\)"),
    ({"schemes": ("litert/int4",)}, r"unknown LiteRT scheme 'int4'"),
    ({"schemes": ("ort/int8_per_layer_minmax",)}, r"not a valid ONNX Runtime scheme"),
    ({"schemes": ("ort/int8_per_channel_mse",)}, r"minmax\|entropy\|percentile"),
    ({"schemes": "litert/int8"}, r"must be a tuple of names"),
    ({"schemes": ("litert/int8", "litert/int8")}, r"lists a name twice"),
    ({"litert_batch_size": 0}, r"'runtimes.litert_batch_size' must be an int >= 1"),
    ({"backend": "ort"}, r"unknown sweep key 'runtimes.backend'; closest: "),
])
def test_bad_runtimes_keys_are_one_value_error_naming_the_key(override, message):
    config = tiny.get_config().to_dict()
    config["runtimes"].update(override)
    with pytest.raises(ValueError, match=message):
        Sweep.from_config(config)
