"""The parts behind the fault handling of a training run, without training: the workdir lock,
the config comparison on resume, metrics records after the resumed step, stop signals and the
first non-finite leaf."""

import json
import os
import signal
import socket
import subprocess

import numpy as np
import pytest

from kure_jax._arrays import first_non_finite
from kure_jax._interrupts import StopSignals
from kure_jax.training.lock import LOCK_NAME, WorkdirLock, WorkdirLockedError
from kure_jax.training.metrics import MetricsWriter
from kure_jax.training.resume import config_changes


def _holder(workdir, pid, host=None):
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "then",
              "command": "train.py"}
    (workdir / LOCK_NAME).write_text(json.dumps(holder))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    with WorkdirLock(tmp_path) as lock:
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert {"started", "command"} <= set(held)
    assert not (tmp_path / LOCK_NAME).exists()
    _holder(tmp_path, os.getppid())  # a live process of this host
    with pytest.raises(WorkdirLockedError) as info:
        WorkdirLock(tmp_path).__enter__()
    message = str(info.value)
    assert f"in use by pid {os.getppid()} on host {socket.gethostname()}" in message
    assert "--force_unlock" in message and "\n" not in message


@pytest.mark.parametrize("pid, host, force, taken", [
    ("dead", None, False, True),          # a crashed job on this host
    ("live", None, False, False),         # a running job on this host
    ("live", "elsewhere", False, False),  # cannot be checked from here
    ("dead", "elsewhere", False, False),
    ("live", "elsewhere", True, True),    # --force_unlock
])
def test_who_may_take_over_a_lock(tmp_path, pid, host, force, taken):
    _holder(tmp_path, _dead_pid() if pid == "dead" else os.getppid(), host)
    if taken:
        with WorkdirLock(tmp_path, force=force):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not (tmp_path / LOCK_NAME).exists()
    else:
        before = (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(WorkdirLockedError, match="--force_unlock"):
            WorkdirLock(tmp_path, force=force).__enter__()
        assert (tmp_path / LOCK_NAME).read_text() == before


def test_an_unreadable_lock_is_not_taken(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "a", "pi')  # cut short while written
    with pytest.raises(WorkdirLockedError, match="unreadable lock file"):
        WorkdirLock(tmp_path).__enter__()


def test_config_changes_split_meaning_from_bookkeeping():
    stored = {"model": "small_cnn", "batch_size": 128, "log_every_steps": 10,
              "kure": {"lambda_": 1.0, "penalty_impl": "auto"}, "schedule": {"milestones": [30]},
              "dataset_options": {"data_dir": "/a"}}
    new = {"model": "small_cnn", "batch_size": 64, "log_every_steps": 5,
           "kure": {"lambda_": 0.5, "penalty_impl": "jnp"}, "schedule": {"milestones": (30,)},
           "dataset_options": {"data_dir": "/b"}, "added_later": 1}
    changes, notes = config_changes(stored, new)
    assert changes == ["batch_size: 128 -> 64", "kure.lambda_: 1.0 -> 0.5"]
    assert notes == ["added_later: 'absent' -> 1", "dataset_options.data_dir: '/a' -> '/b'",
                     "kure.penalty_impl: 'auto' -> 'jnp'", "log_every_steps: 10 -> 5"]
    assert config_changes(stored, stored) == ([], [])


def test_a_resumed_writer_drops_the_records_after_its_step(tmp_path):
    lines = [{"kind": "train", "step": 2}, {"kind": "eval", "step": 3},
             {"kind": "train", "step": 4},
             {"kind": "eval", "step": 6}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra'  # killed mid-line
    (tmp_path / "metrics.jsonl").write_text(text)
    writer = MetricsWriter(tmp_path, resume_step=3)
    writer.write("train", 4, {"loss": 1.0})
    writer.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in got] == [("train", 2), ("eval", 3), ("train", 4)]
    assert got[-1]["loss"] == 1.0


def test_stop_signals_record_sigterm_instead_of_dying():
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by someone else in this process")
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM: still a request, not a kill
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with StopSignals(sigterm=False):  # multi-process: JAX's preemption service owns SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_first_non_finite_names_the_first_bad_leaf_in_tree_order():
    tree = {"a": {"kernel": np.ones((2, 3), np.float32), "step": np.int32(3)},
            "b": {"bias": np.array([1.0, np.nan, np.inf, -np.inf])},
            "c": {"kernel": np.array([np.nan])}}
    assert first_non_finite(tree) == ("b/bias", "1 NaN, 2 inf of 4 values")
    assert first_non_finite({"a": tree["a"]}) is None
