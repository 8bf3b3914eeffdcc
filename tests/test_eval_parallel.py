"""Data-parallel evaluation (kure_jax.evaluation.EvalMesh): the sweep sharded over 8 simulated
devices, and over 2 processes (eval.py --distributed), gives one device's points bit for bit
when every device evaluates micro-batches of the same size; without micro-batches it agrees to
float32 rounding (XLA tiles a convolution by its batch size, so one example's logits may differ
in the last bit between call shapes)."""

import json
import os
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest
from _training_helpers import ROOT, free_port, load_config, run_processes

from configs.sweeps import tiny
from kure_jax.evaluation import EvalMesh, Sweep, run_sweep, validate_results
from kure_jax.evaluation.forward import batch_rows, evaluate, make_eval_step
from kure_jax.training import train_and_evaluate

TINY_SWEEP = str(ROOT / "configs" / "sweeps" / "tiny.py")
# 300 test images per batch: not a multiple of 8 devices x 38 rows, so batches are padded.
SWEEP_SET = {"eval_batch_size": 300, "weight.bits": (4,), "weight_act.pairs": ((4, 4),),
             "qat.bits": (3,)}
MICRO = 38
TIMEOUT_S = 300
FIELDS = ("checkpoint", "kind", "quantizer", "weight_bits", "act_bits", "step_ratio", "accuracy",
          "loss", "count")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A QAT (LSQ W4A4) tiny run: every point kind of the sweep, W/A calibration included."""
    path = tmp_path_factory.mktemp("parallel_eval") / "qat"
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
    try:
        train_and_evaluate(load_config("mnist5k_qat_w4a4", "tiny"), path)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    return path


def load_sweep(overrides):
    """The tiny sweep with ``{"section.key": value}`` overrides."""
    config = tiny.get_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return Sweep.from_config(config)


def _points(data):
    return [tuple(p[k] for k in FIELDS) for p in data["points"]]


@pytest.fixture(scope="module")
def one_device(checkpoint, tmp_path_factory):
    spec = load_sweep(SWEEP_SET)
    out = tmp_path_factory.mktemp("one_device")
    return run_sweep([str(checkpoint)], spec, out, progress=False,
                     mesh=EvalMesh(jax.devices()[:1], micro_batch=MICRO))


def test_eight_devices_equal_one_device_exactly(checkpoint, one_device, tmp_path):
    assert len(jax.devices()) == 8
    spec = load_sweep(SWEEP_SET)
    data = run_sweep([str(checkpoint)], spec, tmp_path, progress=False,
                     mesh=EvalMesh(micro_batch=MICRO))
    kinds = {p["kind"] for p in data["points"]}
    assert {"fp", "weight", "weight_act", "step_ratio", "qat", "qat_bits",
            "qat_step_ratio"} <= kinds
    assert _points(data) == _points(one_device)  # accuracy and loss, bit for bit
    assert data["devices"] == 8 and one_device["devices"] == 1
    assert all(p["count"] == 1000 for p in data["points"])  # padding rows were masked
    assert {t["kind"] for t in data["timings"]} == kinds
    assert all(t["images_per_second"] > 0 for t in data["timings"])
    validate_results(json.loads((tmp_path / "results.json").read_text()))


def test_without_micro_batches_points_agree_to_float32_rounding(checkpoint, one_device,
                                                                tmp_path):
    spec = load_sweep({**SWEEP_SET, "weight_act.pairs": (), "step_ratio.bits": (),
                       "qat.bits": (), "qat.step_ratio": False})
    data = run_sweep([str(checkpoint)], spec, tmp_path, progress=False, mesh=EvalMesh())
    reference = {(p["kind"], p["quantizer"], p["weight_bits"]): p for p in one_device["points"]}
    for point in data["points"]:
        ref = reference[point["kind"], point["quantizer"], point["weight_bits"]]
        assert point["accuracy"] == ref["accuracy"]
        np.testing.assert_allclose(point["loss"], ref["loss"], rtol=1e-6)


def test_rows_are_summed_in_example_order_whatever_the_batching():
    # The same 10 examples in batches of 4 (padded) and of 10 give bit-identical totals.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 5)).astype(np.float32) * 30
    labels = rng.integers(0, 5, 10).astype(np.int32)
    step = make_eval_step(lambda v, x: x * v)

    def batches(size):
        for start in range(0, 10, size):
            idx = np.arange(start, start + size)
            valid = idx < 10
            idx = np.where(valid, idx, 0)
            yield {"image": logits[idx], "label": labels[idx], "mask": valid.astype(np.float32)}

    a = evaluate(step, np.float32(1), batches(4), mesh=EvalMesh(jax.devices()[:2]))
    b = evaluate(step, np.float32(1), batches(10))
    assert a == b
    rows = np.asarray(batch_rows(logits, labels, np.ones(10, np.float32)), np.float64)
    ce = -(logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
           - logits.max(1, keepdims=True))[np.arange(10), labels]
    np.testing.assert_allclose(rows[:, 1], ce, rtol=1e-5)
    assert a.count == 10 and a.accuracy == np.mean(logits.argmax(1) == labels)


def test_mesh_pads_batches_to_its_row_multiple():
    mesh = EvalMesh(jax.devices()[:4], micro_batch=3)
    assert mesh.row_multiple == 12 and mesh.global_batch_size(13) == 24
    batch = {"image": np.arange(5, dtype=np.float32)[:, None], "label": np.arange(5)}
    placed = mesh.place_batch(batch)
    assert placed["image"].shape == (12, 1)
    np.testing.assert_array_equal(np.asarray(placed["mask"]), [1] * 5 + [0] * 7)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        EvalMesh(micro_batch=0)
    with pytest.raises(ValueError, match="at least one device"):
        EvalMesh([])


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _eval_command(checkpoint, out):
    args = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(checkpoint),
            "--sweep", TINY_SWEEP, "--out", str(out), "--micro_batch", str(MICRO),
            "--noprogress"]
    overrides = {**SWEEP_SET, "step_ratio.bits": (), "qat.step_ratio": False, "qat.bits": ()}
    return args + [f"--sweep.{key}={value}" for key, value in overrides.items()]


def test_two_processes_equal_one_process(checkpoint, tmp_path):
    single = subprocess.run(_eval_command(checkpoint, tmp_path / "one"), env=_env(4), cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]
    address = f"localhost:{free_port()}"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    codes = run_processes(
        [[*_eval_command(checkpoint, tmp_path / "two"), "--distributed",
          f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
         for i in range(2)], logs, env=_env(2), timeout=TIMEOUT_S)
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log.read_text()[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["devices"] == two["devices"] == 4
    assert _points(two) == _points(one) and len(two["points"]) >= 5
    assert "| model |" in logs[0].read_text() and "| model |" not in logs[1].read_text()


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices N (>= 1)"),
    (["--devices", "99"], "--devices 99: only 8 device(s)"),
    (["--process_id", "1"], "need --distributed"),
    (["--micro_batch", "0"], "micro_batch must be >= 1"),
])
def test_parallel_flag_errors(tmp_path, capsys, args, message):
    eval_main = runpy.run_path(str(ROOT / "eval.py"))["main"]
    code = eval_main(["--checkpoint", str(tmp_path), "--sweep", TINY_SWEEP,
                      "--out", str(tmp_path / "out"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines
