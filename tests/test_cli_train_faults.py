"""train.py under a scheduler: SIGTERM (one process and two), a second job on a live workdir.

The contract (train.py's docstring, docs/interruptions.md): SIGTERM ends the current step, saves
and waits for its checkpoint, prints one line and exits 143, on every process of a multi-process
run at a step they agree on; the rerun ends exactly like an uninterrupted run. A second job on
a workdir in use exits 2 with one ``error:`` line naming the holder.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _training_helpers import ROOT, free_port

pytestmark = pytest.mark.slow

TINY = [f"--config={ROOT / 'configs' / 'mnist5k_kure.py'}:tiny"]
TIMEOUT_S = 300


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _start(args, log, env):
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the process
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_records(workdir, count, procs):
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        time.sleep(0.05)
    raise TimeoutError(f"no {count} records in {metrics}")


def _wait(procs):
    try:
        return [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()


def _saved(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_second_job_stops_at_start_up_and_sigterm_saves_the_first(tmp_path):
    workdir = tmp_path / "run"
    args = [*TINY, "--config.num_train_steps=100000", "--config.log_every_steps=1",
            "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000",
            "--workdir", workdir]
    first = _start(args, tmp_path / "first.log", _env())
    _wait_for_records(workdir, 2, [first])
    second = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
    assert f"is in use by pid {first.pid} on host" in errors[0], errors
    assert "--force_unlock" in errors[0] and "Traceback" not in second.stderr

    first.send_signal(signal.SIGTERM)
    assert _wait([first]) == [143]
    log = (tmp_path / "first.log").read_text()
    saved = _saved(workdir)
    assert len(saved) == 1 and saved[0] >= 2, (saved, log[-2000:])
    lines = [line for line in log.splitlines() if line.startswith("stopped by SIGTERM")]
    assert lines == [f"stopped by SIGTERM after step {saved[0]} (checkpoint saved): rerun the "
                     f"same command to continue from {workdir}"], log[-2000:]
    assert "Traceback" not in log and not (workdir / "train.lock").exists()


def _two_processes(args, root, name):
    address = f"localhost:{free_port()}"
    return [_start([*args, "--distributed", f"--coordinator_address={address}",
                    "--num_processes=2", f"--process_id={i}"], root / f"{name}_{i}.log", _env(2))
            for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    steps = 300
    args = [*TINY, f"--config.num_train_steps={steps}", "--config.log_every_steps=10",
            f"--config.eval_every_steps={steps}", f"--config.checkpoint_every_steps={steps}"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    procs = _two_processes([*args, "--workdir", stopped], tmp_path, "stopped")
    _wait_for_records(stopped, 1, procs)
    procs[0].send_signal(signal.SIGTERM)  # a preemption notice for one host only
    codes = _wait(procs)
    logs = [(tmp_path / f"stopped_{i}.log").read_text() for i in range(2)]
    assert codes == [143, 143], [log[-2000:] for log in logs]
    saved = _saved(stopped)
    assert len(saved) == 1 and saved[0] < steps, saved  # one step, the same for both
    for log in logs:
        assert f"stopped by SIGTERM after step {saved[0]} (checkpoint saved)" in log
        assert "Traceback" not in log
    assert f"Stopped by SIGTERM after step {saved[0]}" in logs[0]  # the chief's log line

    for name, workdir in (("resumed", stopped), ("straight", straight)):
        codes = _wait(_two_processes([*args, "--workdir", workdir], tmp_path, name))
        assert codes == [0, 0], (tmp_path / f"{name}_0.log").read_text()[-2000:]
    assert f"Resuming from step {saved[0]}" in (tmp_path / "resumed_0.log").read_text()
    got, want = _records(stopped), _records(straight)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    assert got[-1] == want[-1] and got[-1]["kind"] == "eval"  # bit-exact: the same record
