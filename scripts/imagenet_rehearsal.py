"""CPU dry run of the whole ImageNet path: convert -> train.py -> eval.py -> report.

    python scripts/imagenet_rehearsal.py --out=runs/imagenet_rehearsal   # 1-3 min on 2 CPU cores

The three stages are the real programs, each in its own process, as on a pod:

1. ``convert``: a randomly initialised torchvision ResNet-18 state dict (torchvision's names,
   layouts and init, built with NumPy: no torch needed) is written as ``.safetensors`` and
   converted with ``python -m kure_jax.models.convert --arch resnet18``.
2. ``train``: ``train.py --config configs/imagenet_resnet18_kure.py
   --config.init_from=<converted>`` for a few steps (``--steps``, global batch ``--batch_size``)
   on TFDS's mock ``imagenet2012`` at 224x224, on ``--devices`` simulated CPU devices.
3. ``eval``: ``eval.py --checkpoint <train workdir> --sweep configs/sweeps/tiny.py`` with
   ``--sweep.KEY=VALUE`` overrides (``EVAL_SETS``: 7 points; eval batch and calibration images
   ``--batch_size``) on the same mock data and devices.

Mock data: ``tensorflow_datasets.testing.mock_data(num_examples=N)`` replaces the dataset
reader in-process, so train.py and eval.py are started through this script (``_mock``
mode below), which enters the mock and then runs the program as ``__main__``. Every split then
holds the same ``N`` random examples: small JPEGs of random size (a few dozen pixels a side),
uniform pixels and labels in [0, 1000); ImageNet preprocessing resizes and crops them to 224.
The manual-download check of ``imagenet2012`` still runs, so ``OUT/tfds/downloads/manual`` (the
TFDS default ``manual_dir`` of ``data_dir=OUT/tfds``) gets two empty
``ILSVRC2012_img_{train,val}.tar`` files.

Writes into ``--out`` (which must be empty or new): ``resnet18_random.safetensors``,
``tv_resnet18/`` (the converted checkpoint), ``train/`` (checkpoints, ``metrics.jsonl``),
``eval/`` (``results.json``, ``report.md``, plots), one ``<stage>.log`` per stage, and
``rehearsal.json``: per stage its command, exit code and wall time (process start-up included)
and, for train and eval, the JAX device count and platform the program ran on. Exit code 0 when
every stage succeeded, else the failing stage's code (its log's last lines are printed).
``tests/test_scripts_imagenet_rehearsal.py`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import runpy
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from kure_jax._cli import parse_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
RESNET18_WIDTHS = (64, 128, 256, 512)
# Sweep overrides of the rehearsal: configs/sweeps/tiny.py cut to one point or three of each
# section (7 points: FP, W4 max / per-channel, W4A4, 3 step ratios at 3 bits). The eval batch
# and the calibration images are set to the train batch in `rehearse`.
EVAL_SETS = ("weight.bits=(4,)", "weight_act.pairs=((4, 4),)", "step_ratio.num=3")


def random_torchvision_resnet18(seed: int = 0, num_classes: int = 1000,
                                widths: Sequence[int] = RESNET18_WIDTHS) -> dict[str, np.ndarray]:
    """A randomly initialised torchvision ``resnet18`` state dict, built with NumPy.

    Names and layouts are torchvision's (``conv1.weight`` OIHW, ``fc.weight`` ``(out, in)``,
    BatchNorm ``weight``/``bias``/``running_mean``/``running_var``/``num_batches_tracked``), and
    so is the init: conv weights Kaiming-normal with ``mode="fan_out"`` (std ``sqrt(2 / (O * kh
    * kw))``), BatchNorm scale 1, bias 0, running mean 0, variance 1, the classifier uniform in
    ``+-1 / sqrt(in)``.

    Args:
      seed: NumPy generator seed.
      num_classes: rows of ``fc.weight``.
      widths: the four stages' channel counts (torchvision: 64, 128, 256, 512).

    Returns:
      ``{name: float32 array}`` (``num_batches_tracked`` int64 scalars), 122 entries.
    """
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
        std = np.sqrt(2.0 / (out_ch * k * k))
        state[f"{name}.weight"] = rng.normal(0.0, std, (out_ch, in_ch, k, k)).astype(np.float32)

    def bn(name: str, channels: int) -> None:
        state[f"{name}.weight"] = np.ones(channels, np.float32)
        state[f"{name}.bias"] = np.zeros(channels, np.float32)
        state[f"{name}.running_mean"] = np.zeros(channels, np.float32)
        state[f"{name}.running_var"] = np.ones(channels, np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    conv("conv1", widths[0], 3, 7)
    bn("bn1", widths[0])
    in_ch = widths[0]
    for s, width in enumerate(widths, start=1):
        for b in range(2):
            prefix = f"layer{s}.{b}"
            conv(f"{prefix}.conv1", width, in_ch, 3)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            bn(f"{prefix}.bn2", width)
            if b == 0 and s > 1:  # stride 2 and a width change: the projection shortcut
                conv(f"{prefix}.downsample.0", width, in_ch, 1)
                bn(f"{prefix}.downsample.1", width)
            in_ch = width
    bound = 1.0 / np.sqrt(in_ch)
    state["fc.weight"] = rng.uniform(-bound, bound, (num_classes, in_ch)).astype(np.float32)
    state["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
    return state


def device_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with JAX on ``devices`` simulated CPU devices.

    Sets ``JAX_PLATFORMS=cpu`` and replaces any ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``; both must be set before JAX is imported, hence in a child's environment.
    """
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run_under_mock(argv: Sequence[str]) -> int:
    """``_mock`` mode: run ``PROGRAM ARGS...`` as ``__main__`` inside TFDS's ``mock_data``.

    ``argv`` is ``--num_examples N --data_dir DIR --record FILE PROGRAM ARGS...``; ``DIR``
    replaces the TFDS ``data_dir`` of every builder (TFDS's mock does that with any directory),
    so ``DIR/downloads/manual`` is the default ``manual_dir``. Writes ``{"exit_code",
    "device_count", "platform"}`` (what JAX ran the program on) to ``FILE`` and returns the
    program's exit code.
    """
    parser = argparse.ArgumentParser(prog="imagenet_rehearsal.py _mock")
    parser.add_argument("--num_examples", type=int, required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("program")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    import tensorflow_datasets as tfds

    if str(ROOT) not in sys.path:  # as `python train.py` from ROOT: configs/ imports `configs`
        sys.path.insert(0, str(ROOT))
    code: Any = 0
    # mock_data replaces every builder's data_dir by its own; this one holds downloads/manual.
    with tfds.testing.mock_data(num_examples=args.num_examples, data_dir=args.data_dir):
        sys.argv = [args.program, *args.args]
        try:
            runpy.run_path(args.program, run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
    code = code if isinstance(code, int) else (0 if code is None else 1)
    import jax

    record = {"exit_code": code, "device_count": jax.device_count(),
              "platform": jax.devices()[0].platform}
    pathlib.Path(args.record).write_text(json.dumps(record))
    return code


def _stage(name: str, command: list[str], out: pathlib.Path, env: dict[str, str]) -> dict:
    """Runs one stage's ``command`` from the repository root, output to ``OUT/<name>.log``.

    Returns ``{"command", "exit_code", "seconds", "cpu_seconds"}``: the wall time including
    interpreter and library start-up, and the CPU time (user + system, all threads) of the
    stage's process, which another load on the machine does not inflate as much.
    """
    log = out / f"{name}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shown = [pathlib.Path(c).name if c == sys.executable else c for c in command]
    return {"command": " ".join(shown), "exit_code": proc.returncode,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)}


def _train_step_seconds(workdir: pathlib.Path, batch_size: int) -> list[float]:
    """Seconds per train step as logged in ``metrics.jsonl`` (step 1 includes compilation)."""
    seconds = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and record.get("images_per_sec"):
            seconds.append(round(batch_size / record["images_per_sec"], 3))
    return seconds


def rehearse(out: pathlib.Path, *, steps: int = 2, batch_size: int = 8, num_examples: int = 8,
             devices: int = 8, eval_sets: Sequence[str] = EVAL_SETS, seed: int = 0) -> dict:
    """Runs the three stages into ``out`` (new or empty) and returns the ``rehearsal.json`` data.

    Args:
      out: output directory; must not hold files yet.
      steps: train steps (``--config.num_train_steps``); evaluated and checkpointed at the end.
      batch_size: global train and eval batch; a multiple of ``devices``.
      num_examples: examples of every mock split (train, validation).
      devices: simulated CPU devices of the train and eval processes.
      eval_sets: ``eval.py --sweep.KEY=VALUE`` overrides of ``configs/sweeps/tiny.py``, after
        ``eval_batch_size`` and ``weight_act.calibration_images`` = ``batch_size``.
      seed: seed of the random torchvision weights.

    Returns:
      ``{"settings", "stages": {name: {"command", "exit_code", "seconds", ...}}, "ok"}``; the
      stages after a failed one are not run.

    Raises:
      FileExistsError: if ``out`` holds files.
      ValueError: if ``batch_size`` is not a positive multiple of ``devices``.
    """
    if batch_size <= 0 or batch_size % devices:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the "
                         f"{devices} devices.")
    out = pathlib.Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: remove it or pick another --out.")
    data_dir = out / "tfds"
    manual_dir = data_dir / "downloads" / "manual"  # TFDS's default manual_dir
    manual_dir.mkdir(parents=True, exist_ok=True)
    for name in IMAGENET_TARS:  # mock_data mocks preparation; the manual-file check still runs
        (manual_dir / name).write_bytes(b"")
    from safetensors.numpy import save_file

    weights = out / "resnet18_random.safetensors"
    save_file(random_torchvision_resnet18(seed), str(weights))
    env = device_env(devices)
    python = sys.executable
    mock = [python, str(pathlib.Path(__file__).resolve()), "_mock",
            "--num_examples", str(num_examples), "--data_dir", str(data_dir)]
    eval_sets = (f"eval_batch_size={batch_size}",
                 f"weight_act.calibration_images={batch_size}", *eval_sets)
    converted, workdir, eval_out = out / "tv_resnet18", out / "train", out / "eval"
    commands = {
        "convert": [python, "-m", "kure_jax.models.convert", "--arch=resnet18",
                    f"--weights={weights}", f"--out={converted}"],
        "train": [*mock, "--record", str(out / "train.device.json"), "train.py",
                  "--config", "configs/imagenet_resnet18_kure.py",
                  f"--config.init_from={converted}",
                  f"--config.dataset_options.data_dir={data_dir}",
                  f"--config.dataset_options.manual_dir={manual_dir}",
                  f"--config.batch_size={batch_size}", f"--config.eval_batch_size={batch_size}",
                  f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
                  f"--config.eval_every_steps={steps}",
                  f"--config.checkpoint_every_steps={steps}",
                  f"--workdir={workdir}"],
        "eval": [*mock, "--record", str(out / "eval.device.json"), "eval.py",
                 "--checkpoint", str(workdir), "--sweep", "configs/sweeps/tiny.py",
                 *(f"--sweep.{s}" for s in eval_sets),
                 "--out", str(eval_out), "--noprogress"],
    }
    summary: dict[str, Any] = {
        "settings": {"steps": steps, "batch_size": batch_size, "num_examples": num_examples,
                     "devices": devices, "image_size": 224, "eval_sets": list(eval_sets),
                     "seed": seed, "cpu_count": os.cpu_count()},
        "stages": {}, "ok": False,
    }
    for name, command in commands.items():
        result = _stage(name, command, out, env)
        record = out / f"{name}.device.json"
        if record.exists():
            result.update(json.loads(record.read_text()))
            record.unlink()
        if name == "train" and result["exit_code"] == 0:
            result["step_seconds"] = _train_step_seconds(workdir, batch_size)
        summary["stages"][name] = result
        print(f"{name}: {result['seconds']:.1f} s, {result['cpu_seconds']:.1f} s CPU (exit code "
              f"{result['exit_code']}; log {out / (name + '.log')})", flush=True)
        if result["exit_code"] != 0:
            break
    else:
        summary["ok"] = True
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", "runs/imagenet_rehearsal", "new or empty output directory",
                        flag_values=fv)
    flags.DEFINE_integer("steps", 2, "train steps", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "global train/eval batch, a multiple of --devices",
                         flag_values=fv)
    flags.DEFINE_integer("examples", 8, "examples per mock split", flag_values=fv)
    flags.DEFINE_integer("devices", 8, "simulated CPU devices", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns 0 when every stage succeeded, else the failed stage's code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_mock"]:
        return _run_under_mock(argv[1:])
    args = parse_flags(argv, _define_flags, prog="scripts/imagenet_rehearsal.py",
                       description="CPU dry run of convert -> train.py -> eval.py on mock "
                                   "ImageNet.")
    try:
        summary = rehearse(pathlib.Path(args.out), steps=args.steps, batch_size=args.batch_size,
                           num_examples=args.examples, devices=args.devices)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    for name, stage in summary["stages"].items():
        if stage["exit_code"] != 0:
            tail = (out / f"{name}.log").read_text().splitlines()[-30:]
            print(f"stage {name} failed (exit code {stage['exit_code']}); last lines of its "
                  "log:\n" + "\n".join(tail), file=sys.stderr)
            return stage["exit_code"] or 1
    report = (out / "eval.log").read_text().strip().splitlines()
    print("\n".join(report[-12:]))
    devices = summary["stages"]["train"]["device_count"]
    print(f"done in {sum(s['seconds'] for s in summary['stages'].values()):.1f} s on "
          f"{devices} devices; {out / 'rehearsal.json'}, report {out / 'eval' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
