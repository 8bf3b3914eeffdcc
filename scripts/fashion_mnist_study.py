"""The Fashion-MNIST study end to end: train the ResNet-8 recipes over seeds, then evaluate them.

    python scripts/fashion_mnist_study.py                        # 3 seeds x 8 runs, then eval.py
    python scripts/fashion_mnist_study.py --seeds=0 --recipes=baseline,kure
    python scripts/fashion_mnist_study.py --dry_run              # print the commands only

Each run is ``train.py --config configs/<recipe file> --config.seed=S --workdir
OUT/<recipe>_s<S>``; a run that finished before (``OUT/<recipe>_s<S>/study_done.json``) is
skipped, an interrupted one resumes from its checkpoints. Then one ``eval.py`` over every
checkpoint, grouped by recipe (``--checkpoint RECIPE=DIR``, so the report averages the seeds),
with ``--sweep`` (default ``configs/sweeps/default.py``; ``--sweep_override=--sweep.KEY=VALUE``
adds overrides) into ``OUT/eval``. The wall and CPU seconds of every command go to
``OUT/timings.json`` and are printed at the end.

Recipes (``--recipes``, group names in the report):

* ``baseline``, ``kure``: ``configs/fashion_mnist_baseline.py`` / ``_kure.py`` (float training;
  KURE with the paper's selection, lambda 1, K_T 1.8);
* ``kure_kt3``, ``kure_kt4``: the K_T ablation, ``_kure.py`` with ``--config.kure.target`` 3 / 4;
* ``lsq_w4a4``, ``lsq_w4a4_kure``, ``dorefa_w4a4``, ``dorefa_w4a4_kure``: W4A4 QAT from scratch
  with LSQ or DoReFa, without and with KURE.

A program, not part of the library: it only starts ``train.py`` and ``eval.py``. Exit code 0
done, 1 a bad flag or a failed run or evaluation (its command and exit code are printed).
"""

from __future__ import annotations

import json
import pathlib
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent

# recipe -> (config file, train.py overrides)
RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("fashion_mnist_baseline.py", ()),
    "kure": ("fashion_mnist_kure.py", ()),
    "kure_kt3": ("fashion_mnist_kure.py", ("--config.kure.target=3.0",)),
    "kure_kt4": ("fashion_mnist_kure.py", ("--config.kure.target=4.0",)),
    "lsq_w4a4": ("fashion_mnist_lsq_w4a4.py", ()),
    "lsq_w4a4_kure": ("fashion_mnist_lsq_w4a4_kure.py", ()),
    "dorefa_w4a4": ("fashion_mnist_dorefa_w4a4.py", ()),
    "dorefa_w4a4_kure": ("fashion_mnist_dorefa_w4a4_kure.py", ()),
}
DONE = "study_done.json"

_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), f"Recipes to run, from {list(RECIPES)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_OUT = flags.DEFINE_string("out", "runs/fashion_mnist", "Folder of the runs and the evaluation.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder of the Fashion-MNIST IDX files (default: Debian's / Keras' places).")
_VARIANT = flags.DEFINE_string("variant", "", "Config variant: '' (the recipes) or 'tiny'.")
_TRAIN_OVERRIDE = flags.DEFINE_multi_string(
    "train_override", [], "Extra train.py flag for every run, e.g. --config.num_epochs=1.")
_SWEEP = flags.DEFINE_string(
    "sweep", str(ROOT / "configs" / "sweeps" / "default.py"), "eval.py's --sweep file.")
_SWEEP_OVERRIDE = flags.DEFINE_multi_string(
    "sweep_override", [], "Extra eval.py flag, e.g. --sweep.weight.bits='(4, 3)'.")
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Train only.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")


def train_command(recipe: str, seed: int, workdir: pathlib.Path, *, variant: str = "",
                  data_dir: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The train.py command line of one run.

    Raises:
      ValueError: for an unknown recipe.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {list(RECIPES)}.")
    config_file, overrides = RECIPES[recipe]
    spec = str(ROOT / "configs" / config_file) + (f":{variant}" if variant else "")
    command = [sys.executable, str(ROOT / "train.py"), f"--config={spec}",
               f"--config.seed={seed}", f"--workdir={workdir}", *overrides]
    if data_dir is not None:
        command.append(f"--config.dataset_options.data_dir={data_dir}")
    return [*command, *extra]


def eval_command(runs: Sequence[tuple[str, pathlib.Path]], out: pathlib.Path, sweep: str,
                 extra: Sequence[str] = ()) -> list[str]:
    """The eval.py command over ``runs`` (``(group, workdir)`` pairs) into ``out``."""
    groups = [f"--checkpoint={group}={workdir}" for group, workdir in runs]
    return [sys.executable, str(ROOT / "eval.py"), *groups, f"--sweep={sweep}", f"--out={out}",
            "--noprogress", *extra]


def _timed(command: list[str]) -> dict[str, float | int | str]:
    """Runs ``command`` (output passing through) and returns its exit code, wall and CPU s."""
    print("+", shlex.join(command), flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open("/proc/loadavg") as load:  # the machine may be shared: note how busy it was
        load1 = float(load.read().split()[0])
    return {"command": shlex.join(command), "exit_code": code,
            "wall_s": round(time.monotonic() - start, 1), "cpu_s": round(cpu, 1),
            "load1_at_end": load1}


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_RECIPES.value) - set(RECIPES))
    if unknown:
        raise app.UsageError(f"unknown recipes {unknown}; known: {list(RECIPES)}")
    out = pathlib.Path(_OUT.value).resolve()
    runs, timings = [], {}
    for recipe in _RECIPES.value:
        for seed in map(int, _SEEDS.value):
            workdir = out / f"{recipe}_s{seed}"
            runs.append((recipe, workdir))
            command = train_command(recipe, seed, workdir, variant=_VARIANT.value,
                                    data_dir=_DATA_DIR.value, extra=_TRAIN_OVERRIDE.value)
            if _DRY_RUN.value:
                print(shlex.join(command))
                continue
            if (workdir / DONE).exists():
                print(f"{workdir.name}: done before, skipped", flush=True)
                continue
            timings[workdir.name] = result = _timed(command)
            if result["exit_code"]:
                print(f"error: {workdir.name} failed with exit code {result['exit_code']}",
                      file=sys.stderr)
                return 1
            (workdir / DONE).write_text(json.dumps(result, indent=1) + "\n")
    command = eval_command(runs, out / "eval", _SWEEP.value, _SWEEP_OVERRIDE.value)
    if _DRY_RUN.value:
        print(shlex.join(command))
        return 0
    if not _SKIP_EVAL.value:
        timings["eval"] = _timed(command)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "timings.json"  # merged with the runs of earlier invocations
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**earlier, **timings}, indent=1) + "\n")
    for name, result in timings.items():
        print(f"{name}: {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} CPU s "
              f"(load {result['load1_at_end']:.1f}), exit code {result['exit_code']}")
    return int(any(result["exit_code"] for result in timings.values()))


if __name__ == "__main__":
    app.run(main)
