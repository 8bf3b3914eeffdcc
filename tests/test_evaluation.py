"""Robustness sweeps (kure_jax.evaluation): a tiny sweep end to end on a checkpoint trained here,
the vmapped/mapped sweeps against Python loops, calibration against NumPy, spec validation,
the results schema and an interrupted sweep."""

import json
import pathlib
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sweeps import tiny
from kure_jax import QuantPolicy, quantize_params
from kure_jax.data import get_dataset
from kure_jax.evaluation import (
    Sweep,
    calibrate_activations,
    evaluate,
    make_eval_step,
    run_sweep,
    summary_table,
    validate_results,
)
from kure_jax.evaluation.calibration import activation_quantized, layer_inputs
from kure_jax.evaluation.forward import (
    classifier_apply,
    evaluate_mapped,
    mapped_eval_step,
    ptq_transform,
)
from kure_jax.evaluation.layers import target_layers
from kure_jax.evaluation.report import markdown_report
from kure_jax.evaluation.sweep import Target, plan_sweep
from kure_jax.qat import QATConfig, quantized_init
from kure_jax.training import restore_for_eval, train_and_evaluate

ROOT = pathlib.Path(__file__).parent.parent
TRAIN_STEPS = 30


def tiny_train_config():
    config = runpy.run_path(str(ROOT / "configs" / "mnist5k_kure.py"))["get_config"]("tiny")
    config.num_train_steps = TRAIN_STEPS
    config.eval_every_steps = config.checkpoint_every_steps = TRAIN_STEPS
    config.log_every_steps = TRAIN_STEPS
    return config


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA's optimisation passes dominate these tests' run time; every compared number is
    computed under the same setting, so skipping them changes no assertion."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_run")
    train_and_evaluate(tiny_train_config(), path)
    return path


@pytest.fixture(scope="module")
def restored(workdir):
    return restore_for_eval(workdir)


@pytest.fixture(scope="module")
def dataset():
    return get_dataset("mnist5k")


def paper_where(model, dataset):
    """The sweep's default selection ("paper") resolved for a Linen model."""
    target = Target(label="t", group="t", model=model, variables={}, dataset=dataset)
    return target_layers(target, "paper")[0]


@pytest.fixture(scope="module")
def sweep(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    spec = Sweep.from_config(tiny.get_config())
    data = run_sweep([f"tiny={workdir}"], spec, out, progress=False)
    return spec, data, out


def np_metrics(logits, labels):
    """Accuracy and mean cross-entropy in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return (np.mean(logits.argmax(-1) == labels),
            -np.mean(log_probs[np.arange(len(labels)), labels]))


def np_evaluate(model, variables, dataset):
    images = dataset.eval_batches(global_batch_size=dataset.num_eval_examples)
    batch = next(images)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch["image"])
    return np_metrics(logits, batch["label"])


# ------------------------------------------------------------------ the tiny sweep, end to end


def test_sweep_writes_valid_results(sweep):
    spec, data, out = sweep
    on_disk = json.loads((out / "results.json").read_text())
    validate_results(on_disk)
    assert on_disk == data and on_disk["complete"]
    kinds = [p["kind"] for p in data["points"]]
    weight, wa, ratio = (spec.families[k] for k in ("weight", "weight_act", "step_ratio"))
    per_bits = sum(weight.stochastic_seeds if q.get("rounding") == "stochastic" else 1
                   for q in weight.quantizers.values())
    assert kinds.count("fp") == 1
    assert kinds.count("weight") == len(weight.bits) * per_bits
    assert kinds.count("weight_act") == len(wa.pairs)
    assert kinds.count("step_ratio") == len(ratio.bits) * ratio.num
    assert len(kinds) == len(data["points"]) == 1 + len(weight.bits) * per_bits + len(
        wa.pairs) + len(ratio.bits) * ratio.num
    (checkpoint,) = data["checkpoints"]
    assert checkpoint["group"] == "tiny" and checkpoint["quantized_layers"] == [
        "conv1/kernel", "hidden/kernel"]  # the paper's selection: not stem_conv, not head
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(data["points"])
    report = (out / "report.md").read_text()
    assert f"| {checkpoint['label']} |" in report and "Weight-only PTQ, 2 bits" in report
    for name in ("accuracy_vs_bits", "accuracy_vs_step_ratio", "kurtosis", "weight_histograms"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in report


def test_fp_accuracy_equals_plain_evaluation(sweep, workdir, restored, dataset):
    _, data, _ = sweep
    (fp,) = [p for p in data["points"] if p["kind"] == "fp"]
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in evals if e["kind"] == "eval" and e["step"] == TRAIN_STEPS][-1]
    assert fp["accuracy"] == trained["accuracy"]  # what train.py reported for this checkpoint
    assert fp["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    _, model, variables = restored
    accuracy, loss = np_evaluate(model, variables, dataset)
    assert fp["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert fp["loss"] == pytest.approx(loss, rel=1e-4)
    assert fp["count"] == dataset.num_eval_examples


def test_16_bit_weight_ptq_equals_fp(sweep):
    _, data, _ = sweep
    fp = next(p["accuracy"] for p in data["points"] if p["kind"] == "fp")
    sixteen = [p for p in data["points"] if p["kind"] == "weight" and p["weight_bits"] == 16]
    assert len(sixteen) >= 2
    for point in sixteen:
        assert abs(point["accuracy"] - fp) <= 0.001, point


def test_2_bit_ptq_changes_the_model(sweep):
    _, data, _ = sweep
    fp = next(p for p in data["points"] if p["kind"] == "fp")
    two = next(p for p in data["points"] if p["kind"] == "weight" and p["weight_bits"] == 2
               and p["quantizer"] == "max")
    assert abs(two["loss"] - fp["loss"]) > 1e-3


# ---------------------------------------------------------- mapped sweeps equal Python loops


def loop_reference(model, variables, dataset, policy, where, **per_point):
    """Per-point (accuracy, loss) from quantize_params + model.apply + NumPy, one at a time."""
    (name, values), = per_point.items()
    quantize = jax.jit(lambda p, x: quantize_params(p, policy, where=where, **{name: x}))
    results = []
    for value in values:
        params = quantize(variables["params"], value)
        results.append(np_evaluate(model, {**variables, "params": params}, dataset))
    return results


@pytest.mark.parametrize("chunk", [1, 4])
def test_mapped_step_ratio_sweep_equals_loop(restored, dataset, chunk):
    _, model, variables = restored
    where = paper_where(model, dataset)
    policy = QuantPolicy(bits=3)
    ratios = np.linspace(0.7, 1.3, 7, dtype=np.float32)
    traces = []

    def transform(v, r):
        traces.append(1)  # counts traces, not calls
        return ptq_transform(policy, where=where, over="step_ratio")(v, r)

    step = mapped_eval_step(classifier_apply(model), transform, chunk=chunk)
    batches = list(dataset.eval_batches(global_batch_size=300))  # 4 batches, last one padded
    evaluate_mapped(step, variables, jnp.asarray(ratios), batches[:1])
    first = len(traces)  # lax.map traces its vmapped chunk and, if any, the remainder
    mapped = evaluate_mapped(step, variables, jnp.asarray(ratios), batches)
    assert len(traces) == first <= 2  # no retrace per batch: one program for all ratios
    expected = loop_reference(model, variables, dataset, policy, where, step_ratio=ratios)
    for got, (accuracy, loss) in zip(mapped, expected, strict=True):
        # The same images may be reduced in another order (vmapped convs): allow one flip.
        assert abs(got.accuracy - accuracy) <= 1 / got.count
        assert got.loss == pytest.approx(loss, rel=1e-4)
    losses = [m.loss for m in mapped]
    assert max(losses) - min(losses) > 1e-3  # the ratio really changes the model


def test_stochastic_rounding_seeds_equal_loop(restored, dataset):
    _, model, variables = restored
    where = paper_where(model, dataset)
    target = Target(label="t", group="t", model=model, variables=variables, dataset=dataset)
    spec = Sweep.from_config({"map_chunk": 2, "weight": {
        "bits": (2,), "quantizers": {"sr": {"rounding": "stochastic"}, "max": {}},
        "stochastic_seeds": 3}})
    tasks = [t for t in plan_sweep(target, spec) if t.quantizer == "sr"]
    (task,) = tasks
    points = task.run()
    assert task.num_points == len(points) == 3 and [p["seed"] for p in points] == [0, 1, 2]
    assert points[0]["policy"]["rounding"] == "stochastic" and points[0]["weight_bits"] == 2
    keys = [jax.random.key(seed) for seed in range(3)]
    expected = loop_reference(model, variables, dataset, QuantPolicy(bits=2, rounding="stochastic"),
                              where, key=keys)
    for got, (accuracy, loss) in zip(points, expected, strict=True):
        assert abs(got["accuracy"] - accuracy) <= 1 / got["count"]
        assert got["loss"] == pytest.approx(loss, rel=1e-4)
    assert len({round(p["loss"], 6) for p in points}) == 3  # different seeds, different weights


def test_evaluate_rejects_empty_split(restored):
    _, model, variables = restored
    with pytest.raises(ValueError, match="no batch"):
        evaluate(make_eval_step(classifier_apply(model)), variables, [])
    with pytest.raises(ValueError, match="chunk"):
        mapped_eval_step(classifier_apply(model), lambda v, x: v, chunk=0)
    with pytest.raises(ValueError, match="deterministic"):
        ptq_transform(QuantPolicy(rounding="stochastic"), where=None, over="step_ratio")


# ------------------------------------------------------------------ calibration vs NumPy


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        del train
        h = nn.Dense(6)(x)  # Dense_1 gets a signed input
        h = nn.relu(nn.Dense(5)(h))  # Dense_2 gets an unsigned one
        return nn.Dense(3)(h)


@pytest.mark.parametrize("bits", [2, 4])
def test_calibrated_activation_quant_matches_numpy(bits):
    model = MLP()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(16, 4)).astype(np.float32) for _ in range(2)]
    variables = model.init(jax.random.key(0), batches[0])
    apply_fn = classifier_apply(model)
    layers = ("Dense_1", "Dense_2")
    calib = calibrate_activations(apply_fn, variables, batches, layers=layers, bits=[bits])[bits]

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]
    h1 = [dense("Dense_0", x) for x in batches]
    h2 = [np.maximum(dense("Dense_1", h), 0) for h in h1]
    assert calib.signed == {"Dense_1": True, "Dense_2": False}
    signed_max, unsigned_max = 2 ** (bits - 1) - 1, 2**bits - 1
    step1 = max(np.abs(h).max() for h in h1) / signed_max  # max over all calibration images
    step2 = max(h.max() for h in h2) / unsigned_max
    np.testing.assert_allclose(calib.steps["Dense_1"], step1, rtol=1e-5)
    np.testing.assert_allclose(calib.steps["Dense_2"], step2, rtol=1e-5)

    recorded = layer_inputs(apply_fn, variables, batches[0], layers)
    np.testing.assert_allclose(recorded["Dense_1"], h1[0], rtol=1e-5, atol=1e-6)

    x = rng.normal(size=(8, 4)).astype(np.float32) * 1.5  # some inputs fall outside the range
    quantized = jax.jit(activation_quantized(apply_fn, bits=bits, signed=calib.signed))
    got = quantized(variables, calib.steps, x)
    q1 = np.clip(np.round(dense("Dense_0", x) / step1), -signed_max, signed_max) * step1
    h = np.maximum(dense("Dense_1", q1), 0)
    q2 = np.clip(np.round(h / step2), 0, unsigned_max) * step2
    np.testing.assert_allclose(got, dense("Dense_2", q2), rtol=1e-4, atol=1e-4)


def test_calibration_errors():
    model = MLP()
    x = np.ones((2, 4), np.float32)
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="never called"):
        layer_inputs(classifier_apply(model), variables, x, ["Dense_9"])
    with pytest.raises(ValueError, match="at least one"):
        calibrate_activations(classifier_apply(model), variables, [], layers=["Dense_1"], bits=[4])


# ----------------------------------------------------------------------- QAT checkpoints


def test_qat_rebits_at_trained_bits_equals_as_trained(dataset):
    config = tiny_train_config()
    from kure_jax.training import build_model

    model = build_model(config, axis_name=None)
    qat = QATConfig(weight_bits=4, act_bits=4)
    images = next(dataset.train_batches(seed=0, start_step=0, global_batch_size=64))["image"]
    variables = quantized_init(model, jax.random.key(0), images, qat=qat, train=False)
    target = Target(label="q", group="q", model=model, variables=variables, dataset=dataset,
                    qat=qat)
    # The qat family alone, with the step_ratio section's grid (its own bits: none).
    spec = Sweep.from_config({"qat": {"bits": (4,)},
                              "step_ratio": {"bits": (), "start": 0.9, "stop": 1.1, "num": 3}})
    points = [p for task in plan_sweep(target, spec) for p in task.run()]
    by = {(p["kind"], p["weight_bits"], round(p["step_ratio"], 4)): p for p in points}
    trained = by[("qat", 4, 1.0)]
    assert trained["quantizer"] == qat.name
    for same in (by[("qat_bits", 4, 1.0)], by[("qat_step_ratio", 4, 1.0)]):
        assert same["accuracy"] == trained["accuracy"]
        assert same["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert by[("qat_step_ratio", 4, 0.9)]["loss"] != pytest.approx(trained["loss"], rel=1e-6)
    assert by[("qat_step_ratio", 4, 1.1)]["loss"] != pytest.approx(trained["loss"], rel=1e-6)


# ------------------------------------------------------------- results, report, interrupts


def test_interrupted_sweep_keeps_finished_points(workdir, tmp_path):
    config = tiny.get_config()
    config.weight_act.pairs = ()
    config.report.plots = False
    spec = Sweep.from_config(config)
    finished = []

    def after_task(task, points):
        finished.extend(points)
        if len(finished) >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep([str(workdir)], spec, tmp_path, progress=False, after_task=after_task)
    data = json.loads((tmp_path / "results.json").read_text())
    validate_results(data)
    assert not data["complete"] and data["points"] == finished
    assert "Incomplete sweep" in (tmp_path / "report.md").read_text()


def test_validate_results_rejects_bad_files(sweep):
    _, data, _ = sweep
    for broken, message in [
        ({k: v for k, v in data.items() if k != "points"}, "lacks the field 'points'"),
        ({**data, "points": [{**data["points"][0], "accuracy": 1.5}]}, "accuracy"),
        ({**data, "points": [{**data["points"][0], "checkpoint": "x"}]}, "unknown checkpoint"),
        ({**data, "points": [{k: v for k, v in data["points"][0].items() if k != "seed"}]},
         "lacks"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_results(broken)


def test_summary_names_the_worst_quantizer(sweep):
    _, data, _ = sweep
    two = {p["quantizer"]: p["accuracy"] for p in data["points"]
           if p["kind"] == "weight" and p["weight_bits"] == 2}
    worst = min(two, key=two.get)
    expected = (f"{100 * np.mean(list(two.values())):.1f} / {100 * two[worst]:.1f} "
                f"({worst})")
    assert expected in summary_table(data)


def test_summary_marks_qat_checkpoints(sweep):
    _, data, _ = sweep
    assert "†" not in summary_table(data)
    (checkpoint,) = data["checkpoints"]
    qat = {**data, "checkpoints": [{**checkpoint, "qat": "lsq_w4a4"}]}
    table = summary_table(qat)
    assert f"| {checkpoint['label']} † |" in table and "float shadow weights" in table


def test_grouped_report_averages_checkpoints(sweep):
    _, data, _ = sweep
    first = data["checkpoints"][0]
    second = {**first, "label": "tiny#2"}
    shifted = [{**p, "checkpoint": "tiny#2", "accuracy": p["accuracy"] / 2}
               for p in data["points"]]
    grouped = {**data, "checkpoints": [first, second], "points": data["points"] + shifted}
    fp = next(p["accuracy"] for p in data["points"] if p["kind"] == "fp")
    table = summary_table(grouped, by_group=True)
    assert f"| tiny | {100 * 0.75 * fp:.1f} |" in table  # mean of fp and fp / 2
    report = markdown_report(grouped)
    assert "mean over the checkpoints of each group" in report and " ± " in report
