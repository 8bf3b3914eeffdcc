"""train.py --distributed with two processes on one machine (the multi-host code path on CPU).

Two processes with 2 CPU devices each (gloo collectives, a local coordinator) must train exactly
like one process with 4 devices on the same global batches: same losses, same eval accuracy,
same parameters. This exercises jax.distributed initialisation, per-process data slices
assembled into global arrays, replicated state placement across processes, chief-only metrics
and multi-process Orbax checkpointing and resumption.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _training_helpers import ROOT, free_port, run_processes

from kure_jax.training import restore_for_eval

TRAIN = [sys.executable, str(ROOT / "train.py"),
         "--config", str(ROOT / "configs" / "mnist5k_kure.py") + ":tiny",
         "--config.num_train_steps=4", "--config.eval_every_steps=4",
         "--config.checkpoint_every_steps=4", "--config.log_every_steps=2"]
TIMEOUT_S = 300
# Every test reads the runs of the module fixture: train.py in 1 + 2 processes.
pytestmark = pytest.mark.slow


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the 2-process run (stopped at step 2, then resumed) and of the 1-process,
    4-device run, and the resumed processes' outputs."""
    root = tmp_path_factory.mktemp("multihost")
    multi, single = root / "two_processes", root / "one_process"
    # The 2-process run is interrupted at step 2 and resumed from its checkpoint.
    for stop in (["--stop_at_step=2"], []):
        outputs = _two_processes([*TRAIN, "--workdir", str(multi), *stop], root)
    done = subprocess.run([*TRAIN, "--workdir", str(single)], env=_env(4), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return multi, single, outputs


def _two_processes(command, root):
    """Runs ``command --distributed`` as processes 0 and 1; returns their outputs."""
    address = f"localhost:{free_port()}"
    logs = [root / f"process_{i}.log" for i in range(2)]
    codes = run_processes(
        [[*command, "--distributed", f"--coordinator_address={address}", "--num_processes=2",
          f"--process_id={i}"] for i in range(2)], logs, env=_env(2), timeout=TIMEOUT_S)
    outputs = [log.read_text() for log in logs]
    for code, out in zip(codes, outputs, strict=True):
        assert code == 0, out[-3000:]
    return outputs


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_both_processes_report_the_same_final_accuracy(runs):
    multi, _, outputs = runs
    assert "Resuming from step 2" in (multi.parent / "process_0.log").read_text()
    finals = [next(line for line in out.splitlines() if line.startswith("final test accuracy"))
              for out in outputs]
    assert finals[0] == finals[1]


def test_two_processes_train_like_one(runs):
    multi, single, _ = runs
    got, want = _records(multi), _records(single)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "ce", "kure", "accuracy"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g, w)
    _, _, params_multi = restore_for_eval(multi, which="latest")
    _, _, params_single = restore_for_eval(single, which="latest")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params_multi, params_single)
