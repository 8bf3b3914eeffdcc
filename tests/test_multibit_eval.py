"""One model at every bit width (kure_jax.evaluation.families.nested and .qat): the sliced and
re-quantised evaluation of a tiny model against NumPy, and multi-bit QAT checkpoints
(Any-Precision with per-width BatchNorm, Matryoshka) loaded and swept at each trained width."""

import math
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from _training_helpers import load_config

from kure_jax.evaluation import Sweep, load_checkpoint, run_sweep
from kure_jax.evaluation.families import FAMILIES
from kure_jax.evaluation.families.nested import nested_transform
from kure_jax.evaluation.families.qat import nearest_width
from kure_jax.evaluation.sweep import Target, plan_sweep
from kure_jax.training import train_and_evaluate
from kure_jax.training.build import multibit_widths

pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """As in test_evaluation.py: XLA's optimisation passes dominate the run time; every
    compared number is computed under the same setting."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# ------------------------------------------------------------ slicing vs a NumPy reference


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class Split:
    """A test split of (N, 4, 4, 1) images in padded batches, as a Dataset's eval_batches."""

    image_shape = (4, 4, 1)

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def eval_batches(self, *, global_batch_size):
        n = len(self.labels)
        for start in range(0, n, global_batch_size):
            images = np.zeros((global_batch_size, *self.image_shape), np.float32)
            labels = np.zeros(global_batch_size, np.int32)
            mask = np.zeros(global_batch_size, np.float32)
            chunk = slice(start, min(start + global_batch_size, n))
            m = chunk.stop - chunk.start
            images[:m], labels[:m], mask[:m] = self.images[chunk], self.labels[chunk], 1.0
            yield {"image": images, "label": labels, "mask": mask}


def np_nested(w, r, c):
    """The top r bits of per-output-channel min-max c-bit codes, in float32 as the library."""
    w = np.asarray(w, np.float32)
    lo, hi = w.min(axis=0, keepdims=True), w.max(axis=0, keepdims=True)
    scale = np.maximum((hi - lo) / np.float32(2.0**c - 1), np.finfo(np.float32).tiny)
    zero = np.round(-lo / scale)
    codes = np.clip(np.round(w / scale) + zero, 0, 2**c - 1)
    step = np.float32(2.0 ** (c - r))
    top = np.clip(np.floor(codes / step + np.float32(0.5)), 0, 2**r - 1) * step
    return (top - zero) * scale


def np_logits(params, images):
    x = images.reshape(len(images), -1).astype(np.float64)
    h = np.maximum(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], 0)
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def np_metrics(params, images, labels):
    logits = np_logits(params, images)
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels]
    return float(np.mean(logits.argmax(axis=1) == labels)), float(ce.mean())


@pytest.fixture(scope="module")
def mlp_points():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(50, 4, 4, 1)).astype(np.float32)
    model = MLP()
    params = jax.tree.map(np.asarray, model.init(jax.random.key(1), images[:1])["params"])
    # Labels of the float model with 20% replaced: accuracy moves with the weights both ways.
    labels = np_logits(params, images).argmax(axis=1)
    labels = np.where(rng.random(50) < 0.2, rng.integers(0, 10, 50), labels)
    spec = Sweep.from_config({"layers": "kernels", "eval_batch_size": 20,
                              "nested": {"bits": (8, 4, 3, 2)}})
    target = Target(label="mlp", group="mlp", model=model, variables={"params": params},
                    dataset=Split(images, labels.astype(np.int32)))
    points = [p for task in plan_sweep(target, spec) for p in task.run()]
    return params, images, labels, points


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("kind", ["nested_slice", "nested_requant"])
def test_nested_points_match_numpy(mlp_points, kind, bits):
    params, images, labels, points = mlp_points
    (point,) = [p for p in points if p["kind"] == kind and p["weight_bits"] == bits]
    c = 8 if kind == "nested_slice" else bits
    quantized = {layer: {"kernel": np_nested(v["kernel"], bits, c), "bias": v["bias"]}
                 for layer, v in params.items()}
    accuracy, loss = np_metrics(quantized, images, labels)
    assert point["count"] == 50 and point["policy"]["nest_bits"] == c
    assert point["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert point["loss"] == pytest.approx(loss, rel=1e-5)


def test_slice_and_requant_agree_at_the_code_width_and_differ_below(mlp_points):
    _, _, _, points = mlp_points
    by = {(p["kind"], p["weight_bits"]): p for p in points}
    assert by["nested_slice", 8]["loss"] == by["nested_requant", 8]["loss"]
    assert by["nested_slice", 2]["loss"] != by["nested_requant", 2]["loss"]
    assert FAMILIES["nested"].kinds == ("nested_requant", "nested_slice")


def test_a_sliced_kernel_has_at_most_2_to_the_r_levels_per_channel(mlp_points):
    params = mlp_points[0]
    out = nested_transform(2, nest_bits=8, per_channel=True, where=None)({"params": params})
    kernel = np.asarray(out["params"]["Dense_0"]["kernel"])
    assert max(len(np.unique(kernel[:, j])) for j in range(kernel.shape[1])) <= 4
    assert np.array_equal(out["params"]["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_nearest_width_prefers_the_wider_on_a_tie():
    assert [nearest_width(b, [8, 4, 2]) for b in (8, 6, 5, 3, 2)] == [8, 8, 4, 4, 2]


def test_nested_spec_validation():
    assert Sweep.from_config({"nested": {}}).families["nested"].bits == ()  # off by default
    with pytest.raises(ValueError, match=re.escape("must not exceed 'nested.nest_bits'")):
        Sweep.from_config({"nested": {"bits": (8, 4), "nest_bits": 6}})
    with pytest.raises(ValueError, match=re.escape("'nested.per_channel' must be True or False")):
        Sweep.from_config({"nested": {"per_channel": 1}})
    with pytest.raises(ValueError, match=re.escape("unknown sweep key 'nested.bit'")):
        Sweep.from_config({"nested": {"bit": (4,)}})


# ------------------------------------------------------------- multi-bit QAT checkpoints

NESTED = (8, 4, 3, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Any-Precision (DoReFa W/A, per-width BatchNorm) and Matryoshka (shared BatchNorm), the
    shipped configs' tiny variants: 6 steps each."""
    out = {}
    for name in ("mnist5k_anyprecision", "mnist5k_matryoshka"):
        workdir = tmp_path_factory.mktemp(name)
        out[name] = (workdir, train_and_evaluate(load_config(name, "tiny"), workdir))
    return out


@pytest.fixture(scope="module")
def sweep(runs, tmp_path_factory):
    spec = Sweep.from_config({
        "eval_batch_size": 200, "report": {"histogram_layers": 1}, "fp": {},
        "weight": {"bits": (4,), "quantizers": {"max": {}}},
        "step_ratio": {"bits": (3,), "num": 3}, "qat": {"bits": (8, 6, 2)},
        "nested": {"bits": NESTED}})
    out = tmp_path_factory.mktemp("multibit_eval")
    data = run_sweep([f"{name}={workdir}" for name, (workdir, _) in runs.items()], spec, out,
                     which="latest", progress=False)
    return data, out


def points(data, group, kind, **match):
    return [p for p in data["points"] if p["group"] == group and p["kind"] == kind
            and all(p[k] == v for k, v in match.items())]


def test_per_width_batch_stats_load(runs):
    workdir, _ = runs["mnist5k_anyprecision"]
    loaded = load_checkpoint(str(workdir), which="latest")
    assert sorted(loaded.widths) == [2, 4, 8]
    (q8, s8), (q2, s2) = loaded.widths[8], loaded.widths[2]
    assert (q8.weight_bits, q8.act_bits, q2.weight_bits, q2.act_bits) == (8, 8, 2, 2)
    assert loaded.qat == q8 and loaded.variables["batch_stats"] is s8
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s8),
                                                         jax.tree.leaves(s2), strict=True))
    with pytest.raises(KeyError, match="w4"):
        multibit_widths(loaded.config, {"w8": s8, "w2": s2})


def test_qat_points_per_width_equal_the_training_evaluation(sweep, runs):
    data, _ = sweep
    for name, (_, result) in runs.items():
        for bits in (8, 4, 2):
            (point,) = points(data, name, "qat", weight_bits=bits)
            # The training's own per-width evaluation (another compiled program: at most one
            # test image may flip on a last-bit difference of the logits).
            assert point["accuracy"] == pytest.approx(result.eval_metrics[f"accuracy_w{bits}"],
                                                      abs=1.5 / point["count"])
        assert len(points(data, name, "qat")) == 3


def test_matryoshka_sliced_at_a_trained_width_is_that_width_as_trained(sweep):
    data, _ = sweep
    for bits in (8, 4, 2):
        (sliced,) = points(data, "mnist5k_matryoshka", "nested_slice", weight_bits=bits)
        (trained,) = points(data, "mnist5k_matryoshka", "qat", weight_bits=bits)
        assert sliced["accuracy"] == pytest.approx(trained["accuracy"], abs=1.5 / sliced["count"])
        assert sliced["loss"] == pytest.approx(trained["loss"], rel=1e-4)


def test_other_widths_use_the_nearest_trained_widths_statistics(sweep):
    data, _ = sweep
    for name in ("mnist5k_anyprecision", "mnist5k_matryoshka"):
        (at8,) = points(data, name, "qat_bits", weight_bits=8)
        (trained8,) = points(data, name, "qat", weight_bits=8)
        assert at8["accuracy"] == trained8["accuracy"] and at8["loss"] == trained8["loss"]
        (at6,) = points(data, name, "qat_bits", weight_bits=6)
        assert math.isfinite(at6["loss"])
    (ap6,) = points(data, "mnist5k_anyprecision", "qat_bits", weight_bits=6)
    assert ap6["act_bits"] == 6  # activations at the width too, as every width was trained
    (mat6,) = points(data, "mnist5k_matryoshka", "qat_bits", weight_bits=6)
    assert mat6["act_bits"] is None


def test_every_section_runs_for_multibit_checkpoints(sweep):
    data, out = sweep
    for name in ("mnist5k_anyprecision", "mnist5k_matryoshka"):
        assert len(points(data, name, "fp")) == 1
        assert len(points(data, name, "weight")) == 1
        assert len(points(data, name, "step_ratio")) == 3
        for kind in ("nested_requant", "nested_slice"):
            assert sorted(p["weight_bits"] for p in points(data, name, kind)) == sorted(NESTED)
    entry = {c["group"]: c for c in data["checkpoints"]}
    assert entry["mnist5k_anyprecision"]["qat_widths"] == [8, 4, 2]
    report = (out / "report.md").read_text()
    assert "### One model at every width" in report
    assert "w8-dorefa/a8-dorefa: " in report and "w2-dorefa/a2-dorefa: " in report
    assert (out / "nested_bits.png").stat().st_size > 0

