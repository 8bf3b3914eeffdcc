"""scripts/fashion_mnist_study.py: its train.py / eval.py command lines, and one tiny study end
to end (one recipe, one seed, tiny variant) on IDX files the test writes."""

import gzip
import importlib.util
import json
import os
import shlex
import struct
import subprocess
import sys

import numpy as np
import pytest
from _training_helpers import ROOT

from kure_jax.data.idx_datasets import IDX_FILES


def _script():
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_study", ROOT / "scripts" / "fashion_mnist_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _script()


@pytest.mark.parametrize("recipe", list(study.RECIPES))
def test_train_commands_name_existing_recipes(recipe, tmp_path):
    command = study.train_command(recipe, 2, tmp_path / "w", data_dir="/data/fm",
                                  extra=["--config.num_epochs=1"])
    config = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--config="))
    assert os.path.isfile(config)
    assert "--config.seed=2" in command and f"--workdir={tmp_path / 'w'}" in command
    assert command[-2:] == ["--config.dataset_options.data_dir=/data/fm", "--config.num_epochs=1"]
    if recipe.startswith("kure_kt"):
        assert f"--config.kure.target={recipe[-1]}.0" in command


def test_tiny_variant_unknown_recipe_and_eval_groups(tmp_path):
    command = study.train_command("kure", 0, tmp_path, variant="tiny")
    assert any(arg.endswith("fashion_mnist_kure.py:tiny") for arg in command)
    with pytest.raises(ValueError, match="unknown recipe 'kure2'"):
        study.train_command("kure2", 0, tmp_path)
    runs = [("kure", tmp_path / "kure_s0"), ("kure", tmp_path / "kure_s1")]
    command = study.eval_command(runs, tmp_path / "eval", "sweep.py", ["--sweep.layers=paper"])
    assert command[2:4] == [f"--checkpoint=kure={tmp_path / 'kure_s0'}",
                            f"--checkpoint=kure={tmp_path / 'kure_s1'}"]
    assert command[-3:] == [f"--out={tmp_path / 'eval'}", "--noprogress", "--sweep.layers=paper"]


@pytest.mark.slow
def test_dry_run_prints_every_run_then_the_evaluation(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fashion_mnist_study.py"), "--dry_run",
         f"--out={tmp_path}"], capture_output=True, text=True, timeout=120, check=True)
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 * len(study.RECIPES) + 1
    assert all(line[1].endswith("train.py") for line in lines[:-1])
    assert lines[-1][1].endswith("eval.py")
    assert sum(arg.startswith("--checkpoint=") for arg in lines[-1]) == 3 * len(study.RECIPES)
    assert not any(tmp_path.iterdir())  # nothing run, nothing written


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.mark.slow
def test_tiny_study_trains_skips_finished_runs_and_evaluates(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 16)):
        images, labels = IDX_FILES[split]
        _write_idx(data / f"{images}.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{labels}.gz", np.arange(n) % 10)
    out = tmp_path / "study"
    command = [sys.executable, str(ROOT / "scripts" / "fashion_mnist_study.py"),
               "--recipes=lsq_w4a4", "--seeds=0", "--variant=tiny", f"--out={out}",
               f"--data_dir={data}", "--train_override=--config.dataset_options.num_train=64",
               f"--sweep={ROOT / 'configs' / 'sweeps' / 'tiny.py'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1800)  # minutes on a busy 2-core machine
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"lsq_w4a4_s0", "eval"}
    assert all(t["exit_code"] == 0 and t["cpu_s"] > 0 for t in timings.values())
    assert (out / "eval" / "results.json").is_file()
    # A second call skips the finished runs (and does not evaluate with --skip_eval).
    again = subprocess.run([*command, "--skip_eval"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 1, again.stdout
