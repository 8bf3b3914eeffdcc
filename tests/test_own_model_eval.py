"""The robustness report of a user's own model: ``evaluate_model`` on one small CNN written as
Linen, NNX and plain JAX, against the checkpoint path's engine and NumPy; ``eval.py --model``
end to end with Orbax and safetensors params; one error line and exit code 2 per bad input."""

import importlib.util
import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from kure_jax.data import InMemoryDataset, load_mnist5k
from kure_jax.evaluation import Sweep, evaluate_model, validate_results
from kure_jax.evaluation._types import calibration_images
from kure_jax.evaluation.factory import load_params, save_safetensors
from kure_jax.evaluation.sweep import Target, plan_sweep

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "my_models.py"
TINY_SWEEP = str(ROOT / "configs" / "sweeps" / "tiny.py")
_spec = importlib.util.spec_from_file_location("my_models_under_test", EXAMPLE)
my_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(my_models)

SPEC = Sweep.from_config({
    "eval_batch_size": 100, "report": {"histogram_layers": 1, "plots": False}, "fp": {},
    "weight": {"bits": (4, 2), "quantizers": {"max": {}, "per_channel": {"axis": -1}}},
    "weight_act": {"pairs": ((8, 8), (4, 4)), "calibration_images": 64},
    "step_ratio": {"bits": (3,), "num": 3}})
NUM_TEST = 300
# eval.py runs: the tiny sweep cut down to a few points of each section.
CLI_SWEEP = ["--sweep", TINY_SWEEP, "--sweep.weight.bits=(4, 2)",
             "--sweep.weight_act.pairs=((8, 8),)", "--sweep.step_ratio.num=3", "--noprogress"]


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA's optimisation passes dominate these tests' run time; every compared number is
    computed under the same setting."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def variables():
    """The example's Linen CNN after 60 Adam steps on the shipped digits (shared by all)."""
    return my_models.train(steps=60)


@pytest.fixture(scope="module")
def subset():
    """300 test digits (3 batches of 100) and 400 training digits as an in-memory dataset."""
    train, test = load_mnist5k("train"), load_mnist5k("test")
    return InMemoryDataset(name="subset", train_images=train.images[:400],
                           train_labels=train.labels[:400], eval_images=test.images[:NUM_TEST],
                           eval_labels=test.labels[:NUM_TEST], num_classes=10)


def pairs(dataset):
    return [(b["image"], b["label"]) for b in dataset.eval_batches(global_batch_size=100)]


@pytest.fixture(scope="module")
def linen(variables, subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("linen")
    module = my_models.make()
    data = evaluate_model(lambda v, x: module.apply(v, x), variables, pairs(subset), SPEC,
                          out=out, name="linen", progress=False, module=module,
                          calibration=calibration_images(subset, 64, 0))
    return data, out


def by_key(points):
    return {(p["kind"], p["quantizer"], p["weight_bits"], p["act_bits"], p["step_ratio"],
             p["seed"]): p for p in points}


def assert_same_points(got, want, *, loss_rel=1e-5):
    got, want = by_key(got), by_key(want)
    assert got.keys() == want.keys()
    for key, point in got.items():
        # Another program for the same network may reduce in another order: one flip at most.
        assert abs(point["accuracy"] - want[key]["accuracy"]) <= 1 / point["count"], key
        assert point["loss"] == pytest.approx(want[key]["loss"], rel=loss_rel), key
        assert point["count"] == want[key]["count"]


def np_metrics(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return (float(np.mean(logits.argmax(-1) == labels)),
            float(-np.mean(log_probs[np.arange(len(labels)), labels])))


def np_quantize_max(w, bits):
    """Per-tensor symmetric max-abs quantisation on the narrow grid, in NumPy."""
    w = np.asarray(w, np.float64)
    q = 2 ** (bits - 1) - 1
    step = np.abs(w).max() / q
    return (np.clip(np.round(w / step), -q, q) * step).astype(np.float32)


# ------------------------------------------------------------------------- evaluate_model


def test_linen_model_equals_the_checkpoint_engine(linen, variables, subset):
    data, out = linen
    on_disk = json.loads((out / "results.json").read_text())
    validate_results(on_disk)
    assert on_disk == data and data["complete"] and data["skipped"] == []
    (entry,) = data["checkpoints"]
    assert entry["quantized_layers"] == ["params/conv2/kernel", "params/hidden/kernel"]
    # The checkpoint path's engine: a Target of the Linen model on a kure_jax Dataset,
    # its layer order from model.init (not the jaxpr), its calibration from train_batches.
    target = Target(label="linen", group="linen", model=my_models.make(),
                    variables=variables, dataset=subset)
    reference = [p for task in plan_sweep(target, SPEC) for p in task.run()]
    assert_same_points(data["points"], reference)
    kinds = [p["kind"] for p in data["points"]]
    assert kinds.count("weight_act") == 2 and kinds.count("step_ratio") == 3
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()


def test_linen_points_match_numpy(linen, variables, subset):
    data, _ = linen
    points = by_key(data["points"])
    module = my_models.make()
    images, labels = subset.eval_images, subset.eval_labels
    apply = jax.jit(module.apply)
    fp = points[("fp", "fp", None, None, 1.0, None)]
    accuracy, loss = np_metrics(apply(variables, images), labels)
    assert fp["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert fp["loss"] == pytest.approx(loss, rel=1e-4) and fp["count"] == NUM_TEST
    for bits in (4, 2):
        params = {name: dict(layer) for name, layer in variables["params"].items()}
        for name in ("conv2", "hidden"):  # the paper's layers: not the first conv nor head
            params[name]["kernel"] = np_quantize_max(params[name]["kernel"], bits)
        accuracy, loss = np_metrics(apply({"params": params}, images), labels)
        point = points[("weight", "max", bits, None, 1.0, None)]
        assert abs(point["accuracy"] - accuracy) <= 1 / NUM_TEST
        assert point["loss"] == pytest.approx(loss, rel=1e-4)
    assert points[("weight", "max", 2, None, 1.0, None)]["loss"] != pytest.approx(fp["loss"])


def check_skipped(data, out, label):
    skipped = data["skipped"]
    assert [(r["kind"], r["quantizer"], r["weight_bits"], r["act_bits"]) for r in skipped] == [
        ("weight_act", "W8A8", 8, 8), ("weight_act", "W4A4", 4, 4)]
    assert all(r["checkpoint"] == label and "Linen" in r["reason"] for r in skipped)
    assert not [p for p in data["points"] if p["kind"] == "weight_act"]
    report = (out / "report.md").read_text()
    assert "## Skipped points" in report and f"| {label} | weight_act | W4A4 |" in report
    on_disk = json.loads((out / "results.json").read_text())
    validate_results(on_disk)
    assert on_disk["skipped"] == skipped


def linen_without_wa(data):
    return [p for p in data["points"] if p["kind"] != "weight_act"]


def test_nnx_model_equals_linen(linen, variables, subset, tmp_path):
    model = my_models.make_nnx()
    _, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, variables["params"]))
    nnx.update(model, state)  # the Linen weights in the NNX module
    graphdef, state = nnx.split(model)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # the README's NNX recipe
    data = evaluate_model(apply, state, pairs(subset), SPEC, out=tmp_path, name="nnx",
                          progress=False)
    check_skipped(data, tmp_path, "nnx")
    # The NNX state is sorted by name: "paper" still skips conv1 and head (jaxpr call order).
    assert data["checkpoints"][0]["quantized_layers"] == ["conv2/kernel", "hidden/kernel"]
    assert_same_points(data["points"], linen_without_wa(linen[0]))


def test_plain_jax_model_equals_linen(linen, variables, subset, tmp_path):
    batches = pairs(subset)
    data = evaluate_model(my_models.tiny_cnn_apply, variables["params"], lambda: iter(batches),
                          SPEC, out=tmp_path, name="plain", progress=False)
    check_skipped(data, tmp_path, "plain")
    assert_same_points(data["points"], linen_without_wa(linen[0]), loss_rel=1e-4)


def test_evaluate_model_input_errors(variables, subset, tmp_path):
    batches = pairs(subset)
    fn, params = my_models.tiny_cnn_apply, variables["params"]
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluate_model(fn, params, iter(batches), SPEC, out=tmp_path)
    with pytest.raises(ValueError, match="yielded no batch"):
        evaluate_model(fn, params, [], SPEC, out=tmp_path)
    rgb = [(np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int32))]
    with pytest.raises(ValueError, match=r"rejects images of shape \(2, 32, 32, 3\)"):
        evaluate_model(fn, params, rgb, SPEC, out=tmp_path)
    with pytest.raises(ValueError, match=r"labels \(3,\) do not match"):
        evaluate_model(fn, params, [(batches[0][0], batches[0][1][:3])], SPEC, out=tmp_path)
    nan_bias = jax.tree.map(np.array, params)
    nan_bias["conv1"]["bias"][0] = np.nan  # the first layer: every logit would be NaN
    with pytest.raises(ValueError, match=r"model m: conv1/bias holds 1 NaN of 8 values; "
                                         "non-finite weights cannot be evaluated"):
        evaluate_model(fn, nan_bias, batches, SPEC, out=tmp_path, name="m")
    assert not (tmp_path / "results.json").exists()  # all of it before any output


# ------------------------------------------------------------------------- eval.py --model


@pytest.fixture(scope="module")
def params_files(variables, tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    save_safetensors(variables, root / "my.safetensors")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((root / "orbax").absolute(), variables)
    checkpointer.wait_until_finished()
    return root


@pytest.fixture(scope="module")
def eval_main():
    return runpy.run_path(str(ROOT / "eval.py"))["main"]


def run_cli(eval_main, capsys, *args):
    code = eval_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_save_and_load_params_round_trip(variables, params_files):
    template = jax.eval_shape(lambda: variables)
    for path in (params_files / "my.safetensors", params_files / "orbax"):
        loaded = load_params(path, template)
        assert jax.tree.structure(loaded) == jax.tree.structure(variables)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
            np.testing.assert_array_equal(a, b)
    # The same file read into the params-only template of the NNX / plain-JAX forms.
    inner = load_params(params_files / "my.safetensors", template["params"])
    np.testing.assert_array_equal(inner["head"]["kernel"], variables["params"]["head"]["kernel"])


def test_cli_model_end_to_end(eval_main, capsys, params_files, variables, tmp_path,
                              monkeypatch):
    results = {}
    for name, params in (("orbax", params_files / "orbax"),
                         ("safetensors", params_files / "my.safetensors")):
        out = tmp_path / name
        code, stdout, stderr = run_cli(eval_main, capsys, "--model", f"{EXAMPLE}:make",
                                       "--params", params, "--dataset", "mnist5k", "--out", out,
                                       *CLI_SWEEP)
        assert code == 0, stderr
        assert stdout.startswith("| model | FP | W4 max | W2 max |")
        assert "| my_models:make |" in stdout
        results[name] = json.loads((out / "results.json").read_text())
        validate_results(results[name])
    orbax, safetensors = results["orbax"], results["safetensors"]
    assert orbax["points"] == safetensors["points"]  # the same weights, the same numbers
    (entry,) = orbax["checkpoints"]
    assert entry["model"] == f"{EXAMPLE}:make" and entry["model_kind"] == "linen"
    assert entry["dataset"] == "mnist5k" and entry["num_test_images"] == 1000
    assert entry["path"] == str((params_files / "orbax").absolute())
    assert [p["kind"] for p in orbax["points"]].count("weight_act") == 1
    assert orbax["skipped"] == []
    # The float point on the full test split, against NumPy.
    test = load_mnist5k("test")
    fp = next(p for p in orbax["points"] if p["kind"] == "fp")
    accuracy, _ = np_metrics(jax.jit(my_models.make().apply)(variables, test.images), test.labels)
    assert fp["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for png in ("accuracy_vs_bits", "accuracy_vs_step_ratio", "kurtosis", "weight_histograms"):
        assert (tmp_path / "orbax" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"

    # The NNX form of the same network, by dotted module name from the current directory,
    # reads the same safetensors file: the same weight-only points, W/A skipped.
    monkeypatch.chdir(ROOT / "examples")
    code, stdout, stderr = run_cli(eval_main, capsys, "--model", "my_models:make_nnx",
                                   "--params", params_files / "my.safetensors", "--dataset",
                                   "mnist5k", "--out", tmp_path / "nnx", "--name", "nnx",
                                   *CLI_SWEEP)
    assert code == 0, stderr
    assert "1 skipped" in stdout
    nnx_data = json.loads((tmp_path / "nnx" / "results.json").read_text())
    assert [r["quantizer"] for r in nnx_data["skipped"]] == ["W8A8"]
    assert nnx_data["checkpoints"][0]["model_kind"] == "nnx"
    assert_same_points([{**p, "checkpoint": "x", "group": "x"} for p in nnx_data["points"]],
                       [p for p in orbax["points"] if p["kind"] != "weight_act"])


def write_module(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return path


def bad_params(variables, tmp_path, change):
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    change(flat)
    from safetensors.numpy import save_file

    path = tmp_path / "bad.safetensors"
    save_file(flat, str(path))
    return path


def _reshape_conv(flat):
    flat["params/conv2/kernel"] = np.zeros((3, 3, 8, 12), np.float32)


def _extra_leaf(flat):
    flat["params/extra/kernel"] = np.zeros((2, 2), np.float32)


ERRORS = {
    "model and checkpoint": (lambda t, v, p: ["--model", f"{EXAMPLE}:make", "--checkpoint", t],
                             "--model and --checkpoint are mutually exclusive"),
    "model without params": (lambda t, v, p: ["--model", f"{EXAMPLE}:make"],
                             "--model needs --params and --dataset"),
    "module does not import": (
        lambda t, v, p: ["--model", f"{write_module(t, 'broken', 'import no_such_pkg_zq')}:make"],
        "module '{tmp}/broken.py' cannot be imported (ModuleNotFoundError: No module named "
        "'no_such_pkg_zq')"),
    "no such module": (lambda t, v, p: ["--model", "no_such_module_zq:make"],
                       "module 'no_such_module_zq' cannot be imported (ModuleNotFoundError"),
    "factory missing": (lambda t, v, p: ["--model", f"{EXAMPLE}:mkae"],
                        "has no attribute 'mkae' (it defines: "),
    "leaf of another shape": (
        lambda t, v, p: ["--model", f"{EXAMPLE}:make", "--params", bad_params(v, t, _reshape_conv)],
        "leaf 'params/conv2/kernel' has shape (3, 3, 8, 12) in the params file, (3, 3, 8, 16) "
        "in the model."),
    "missing leaf": (
        lambda t, v, p: ["--model", f"{EXAMPLE}:make",
                         "--params", bad_params(v, t, lambda f: f.pop("params/head/bias"))],
        "leaf 'params/head/bias' (shape (10,)) is missing from the params file"),
    "extra leaf": (
        lambda t, v, p: ["--model", f"{EXAMPLE}:make", "--params", bad_params(v, t, _extra_leaf)],
        "the params file has a leaf 'params/extra/kernel' (shape (2, 2)) that the model does "
        "not have"),
    "no params file": (lambda t, v, p: ["--model", f"{EXAMPLE}:make",
                                        "--params", t / "none.safetensors"], "no such file"),
    "images rejected": (
        lambda t, v, p: ["--model", f"{write_module(t, 'rgb', RGB_MODEL)}:make",
                         "--params", rgb_params(t)],
        "on dataset mnist5k (10 classes): the model rejects images of shape (2, 28, 28, 1) "
        "(image shape (28, 28, 1)): TypeError"),
}
RGB_MODEL = """import numpy as np

def make():  # a model for 32x32 RGB images
    return (lambda p, x: x.reshape(x.shape[0], 32 * 32 * 3) @ p["w"],
            {"w": np.zeros((32 * 32 * 3, 10), np.float32)})
"""


def rgb_params(tmp_path):
    path = tmp_path / "rgb.safetensors"
    save_safetensors({"w": np.zeros((3072, 10), np.float32)}, path)
    return path


@pytest.mark.parametrize("case", list(ERRORS))
def test_cli_model_errors_are_one_line(case, eval_main, capsys, variables, params_files,
                                       tmp_path):
    make_args, expected = ERRORS[case]
    args = make_args(tmp_path, variables, params_files)
    if "--params" not in args and "needs" not in expected and "--checkpoint" not in args:
        args += ["--params", params_files / "my.safetensors"]
    if "needs" not in expected:
        args += ["--dataset", "mnist5k"]
    code, stdout, stderr = run_cli(eval_main, capsys, *args, "--out", tmp_path / "out",
                                   *CLI_SWEEP)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "out" / "results.json").exists()

