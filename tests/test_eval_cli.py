"""The eval.py command line: an end-to-end run, and one clear error line plus exit code 2 for
each bad input (missing, corrupted or mismatched checkpoint; unknown sweep key or file)."""

import errno
import json
import os
import pathlib
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _training_helpers import interrupt_when

from kure_jax.evaluation import validate_results
from kure_jax.training import train_and_evaluate

ROOT = pathlib.Path(__file__).parent.parent
TINY_SWEEP = str(ROOT / "configs" / "sweeps" / "tiny.py")
# Child processes skip XLA's optimisation passes too: compile time dominates these runs.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = runpy.run_path(str(ROOT / "configs" / "mnist5k_kure.py"))["get_config"]("tiny")
    path = tmp_path_factory.mktemp("cli_run")
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        train_and_evaluate(config, path)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    return path


def run_eval(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=240)


def test_cli_end_to_end(workdir, tmp_path):
    out = tmp_path / "out"
    result = run_eval("--checkpoint", f"a={workdir}", "--checkpoint", f"b={workdir}",
                      "--sweep", TINY_SWEEP, "--sweep.weight_act.pairs=()",
                      "--sweep.weight.bits=(4, 2)", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("| model | FP | W4 max | W2 max |")
    data = json.loads((out / "results.json").read_text())
    validate_results(data)
    labels = [c["label"] for c in data["checkpoints"]]
    assert labels == [workdir.name, f"{workdir.name}#2"]  # the same run twice: unique labels
    assert [c["group"] for c in data["checkpoints"]] == ["a", "b"]
    best = sorted(int(p.name) for p in (workdir / "best").iterdir() if p.name.isdigit())
    for entry in data["checkpoints"]:  # what was evaluated, and how it was chosen
        assert entry["which"] == "best" and entry["step"] in best and entry["skipped_steps"] == []
    by_ckpt = {}
    for p in data["points"]:
        by_ckpt.setdefault(p["checkpoint"], []).append(p["accuracy"])
    np.testing.assert_array_equal(*by_ckpt.values())  # deterministic: same run, same numbers
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()


def corrupt(src, dst):
    shutil.copytree(src, dst)
    for data_file in dst.glob("*/*/state/d/*"):
        data_file.write_bytes(b"\x00not an array" * 4)
    return dst


def truncated_metadata(src, dst):
    """Every step's ``state/_METADATA`` cut short (a JSONDecodeError inside Orbax)."""
    shutil.copytree(src, dst)
    for metadata in dst.glob("*/*/state/_METADATA"):
        metadata.write_text(metadata.read_text()[:40])
    return dst


def mismatch(src, dst):
    """A checkpoint whose weights come from another model config than the one it carries."""
    shutil.copytree(src, dst)
    for config_file in dst.glob("*/*/config/metadata"):
        config = json.loads(config_file.read_text())
        config["model_options"]["hidden"] = 48
        config_file.write_text(json.dumps(config))
    return dst


def a_file(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file"


def bad_sweep_file(tmp_path):
    path = tmp_path / "bad_sweep.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'weight': {'bitz': (4,)}})\n")
    return path


CASES = {
    "missing checkpoint": (lambda w, t: ["--checkpoint", t / "nowhere"], "no such file"),
    "corrupted checkpoint": (lambda w, t: ["--checkpoint", corrupt(w, t / "c")],
                             "cannot be restored"),
    "truncated _METADATA": (lambda w, t: ["--checkpoint", truncated_metadata(w, t / "t")],
                            "cannot be restored"),
    "other model config": (lambda w, t: ["--checkpoint", mismatch(w, t / "m")],
                           "do not match the model of its own config"),
    "unknown sweep key": (lambda w, t: ["--checkpoint", w, "--sweep.weight.bitz=(4,)"],
                          "unknown sweep key 'weight.bitz' (in --sweep.weight.bitz); closest: "
                          "weight.bits, "),
    "unknown sweep section": (lambda w, t: ["--checkpoint", w, "--sweep.wieght.bits=(4,)"],
                              "unknown sweep key 'wieght' (in --sweep.wieght.bits); closest: "
                              "weight, weight_act"),
    "old --set spelling": (lambda w, t: ["--checkpoint", w, "--set", "weight.bits=(4,)"],
                           "--set is gone: use --sweep.KEY=VALUE"),
    "bad sweep value": (lambda w, t: ["--checkpoint", w, "--sweep.weight.bits=(4, 1)"],
                        "sweep key 'weight.bits' needs bit widths that are ints in [2, 16]"),
    "out is a file": (lambda w, t: ["--checkpoint", w, "--out", a_file(t)],
                      "is a file, not a directory"),
    "unknown key in sweep file": (lambda w, t: ["--checkpoint", w, "--sweep", bad_sweep_file(t)],
                                  "unknown sweep key 'weight.bitz'"),
    "missing sweep file": (lambda w, t: ["--checkpoint", w, "--sweep", t / "none.py"],
                           "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_errors_are_one_line(workdir, tmp_path, case):
    make_args, expected = CASES[case]
    args = make_args(workdir, tmp_path)
    if "--sweep" not in args:
        args += ["--sweep", TINY_SWEEP]
    if "--out" not in args:
        args += ["--out", tmp_path / "out"]
    result = run_eval(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def test_ctrl_c_keeps_finished_points(workdir, tmp_path):
    out = tmp_path / "out"
    results = out / "results.json"
    code, stderr = interrupt_when(  # the default sweep: far longer than this test waits
        ROOT / "eval.py", ["--checkpoint", workdir, "--out", out, "--noprogress"],
        ready=lambda: results.is_file() and len(json.loads(results.read_text())["points"]) >= 3,
        env=ENV, timeout=60)
    assert code == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    data = json.loads(results.read_text())
    validate_results(data)
    assert not data["complete"] and len(data["points"]) >= 3


def test_ctrl_c_swallowed_by_a_library_still_stops_the_sweep(monkeypatch, tmp_path):
    # A KeyboardInterrupt raised inside code that discards it (as C code that clears a Python
    # callback's error does) must still stop the sweep at the next task boundary.
    from kure_jax.evaluation import runner

    eval_main = runpy.run_path(str(ROOT / "eval.py"))["main"]
    tasks_run = []

    def fake_run_sweep(checkpoints, spec, out_dir, *, which, progress, after_task, mesh):
        for task in range(5):
            tasks_run.append(task)
            if task == 1:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)  # the handler runs here, inside the swallowing block
                except KeyboardInterrupt:
                    pass
            after_task(task, [])
        return {"checkpoints": [], "points": []}

    monkeypatch.setattr(runner, "run_sweep", fake_run_sweep)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # see WITH_CTRL_C
    try:
        code = eval_main(["--checkpoint", str(tmp_path), "--sweep", TINY_SWEEP,
                          "--out", str(tmp_path / "out")])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert code == 130 and tasks_run == [0, 1]


def test_step_ratio_sweep_benchmark_runs(workdir):
    """benchmarks/eval_step_ratio_sweep.py (moved out of the package) on the tiny checkpoint."""
    import importlib.util

    path = ROOT / "benchmarks" / "eval_step_ratio_sweep.py"
    spec = importlib.util.spec_from_file_location("eval_step_ratio_sweep", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:  # raises RuntimeError if the four methods' accuracies disagree
        rows = bench.time_step_ratio_sweep(str(workdir), bits=(2,), chunk=2)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    assert [(b, name.split(" (")[0]) for b, name, _ in rows] == [
        (2, "mapped chunk=1"), (2, "mapped chunk=2"), (2, "loop, ratio as array"),
        (2, "loop, recompiling per point")]
    assert all(seconds > 0 for *_, seconds in rows)


@pytest.mark.slow  # the workdir fixture trains a model
def test_out_problems_stop_before_any_checkpoint_is_restored(workdir, tmp_path, capsys,
                                                             monkeypatch):
    """A read-only --out (an injected EROFS: the tests run as root, which writes anywhere)."""
    from kure_jax.evaluation import cli, runner

    eval_main = runpy.run_path(str(ROOT / "eval.py"))["main"]
    restored = []
    monkeypatch.setattr(runner, "load_checkpoint", lambda *a, **k: restored.append(a))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", read_only)
    code = eval_main(["--checkpoint", str(workdir), "--sweep", TINY_SWEEP,
                      "--out", str(tmp_path / "ro")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: --out {tmp_path / 'ro'} cannot be written (OSError: [Errno 30] "
                        "Read-only file system).")
    assert restored == []


@pytest.mark.slow
@pytest.mark.parametrize("value, what", [(np.nan, "1 NaN"), (np.inf, "1 inf")])
def test_non_finite_weights_are_refused_naming_the_leaf(workdir, tmp_path, capsys, monkeypatch,
                                                        value, what):
    from kure_jax.training import checkpoint

    restore = checkpoint.load_checkpoint

    def damaged(path, *, which):
        restored = restore(path, which=which)
        params = jax.tree.map(np.asarray, restored.variables["params"])
        params["head"]["bias"] = params["head"]["bias"].copy()
        params["head"]["bias"][3] = value
        return restored._replace(variables={**restored.variables, "params": params})

    monkeypatch.setattr(checkpoint, "load_checkpoint", damaged)
    eval_main = runpy.run_path(str(ROOT / "eval.py"))["main"]
    code = eval_main(["--checkpoint", str(workdir), "--sweep", TINY_SWEEP,
                      "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: checkpoint {workdir}: params/head/bias holds {what} of "
                               "10 values; non-finite weights cannot be evaluated"), lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_a_damaged_latest_step_falls_back_and_is_recorded(workdir, tmp_path):
    """--which latest on a workdir whose newest step has a truncated array file: the step
    before it is evaluated, and results.json says which step and why the newer one was not."""
    damaged = tmp_path / "w"
    shutil.copytree(workdir, damaged)
    steps = sorted(int(p.name) for p in (damaged / "checkpoints").iterdir() if p.name.isdigit())
    if len(steps) < 2:
        pytest.skip("the tiny run keeps a single step")
    for data_file in (damaged / "checkpoints" / str(steps[-1])).glob("state/**/d/*"):
        data_file.write_bytes(data_file.read_bytes()[:7])
    out = tmp_path / "out"
    result = run_eval("--checkpoint", damaged, "--which", "latest", "--sweep", TINY_SWEEP,
                      "--sweep.weight_act.pairs=()", "--sweep.step_ratio.bits=()",
                      "--sweep.weight.bits=(4,)", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (entry,) = json.loads((out / "results.json").read_text())["checkpoints"]
    assert entry["which"] == "latest" and entry["step"] == steps[-2]
    (skipped,) = entry["skipped_steps"]
    assert skipped["path"].endswith(f"checkpoints/{steps[-1]}") and skipped["reason"]
