"""One model for every bit width, three ways: KURE vs Matryoshka vs Any-Precision (issue #12).

    python scripts/multibit_compare.py                     # seed 0 of the five recipes
    python scripts/multibit_compare.py --seeds=3           # docs/results.md, if time allows

Trains each recipe with ``kure_jax.training.train_and_evaluate`` into
``WORKDIR/<recipe>_s<seed>`` (a finished run is reused, an interrupted one resumes), times the
training step of every recipe back to back in this process (``--timing_steps`` steps after two
warm-up steps, ``--timing_rounds`` interleaved rounds, the fastest round's step time; kept in
``WORKDIR/eval/timing.json``, which ``--notiming`` reuses), runs the multi-bit sweep
(``configs/sweeps/multibit.py``) over all checkpoints with ``run_sweep`` into ``WORKDIR/eval``
and prints the accuracy-at-every-width table and the training cost.

Recipes (group names in the report):

* ``baseline`` / ``kure``: ``configs/mnist5k_baseline.py`` / ``configs/mnist5k_kure.py``
  (float training, 10 epochs = 310 steps).
* ``matryoshka``: ``configs/mnist5k_matryoshka.py`` (weights' int8 codes sliced to 8, 4 and
  2 bits, losses summed; 5 epochs = 155 steps); ``matryoshka_kure``: the same with KURE.
* ``anyprecision``: ``configs/mnist5k_anyprecision.py`` (DoReFa W8A8 + W4A4 + W2A2, switchable
  BatchNorm; 5 epochs).

A program, not part of the library: it uses only public ``kure_jax.training``,
``kure_jax.data`` and ``kure_jax.evaluation`` functions.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import runpy
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from kure_jax._cli import parse_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the config files import their shared base (`configs.base`)
    sys.path.insert(0, str(ROOT))

# recipe -> config file
RECIPES: dict[str, str] = {
    "baseline": "mnist5k_baseline.py",
    "kure": "mnist5k_kure.py",
    "matryoshka": "mnist5k_matryoshka.py",
    "anyprecision": "mnist5k_anyprecision.py",
    "matryoshka_kure": "mnist5k_matryoshka_kure.py",
}


def recipe_config(configs: pathlib.Path, recipe: str, seed: int):
    """The training config of ``recipe`` (its file's ``get_config()``) with ``seed``."""
    config = runpy.run_path(str(configs / RECIPES[recipe]))["get_config"]()
    config.seed = seed
    return config


def time_train_steps(configs: Sequence[tuple[str, Any]], *, steps: int, rounds: int
                     ) -> dict[str, dict[str, float]]:
    """Seconds per training step of each config, measured back to back in this process.

    Each config's jitted step runs 2 warm-up steps (compilation), then ``rounds`` rounds of
    ``steps`` steps, the configs interleaved round by round so that a change in the machine's
    load hits all of them alike. Returns ``{name: {"step_s": the fastest round's mean step
    time, "rounds": [...]}}``: on a shared machine the other users only ever add time, so the
    fastest round is the least disturbed one.
    """
    from kure_jax.data import get_dataset
    from kure_jax.training import (
        build_model,
        create_train_state,
        make_optimizer,
        make_schedule,
        make_train_step,
        step_config,
    )
    from kure_jax.training.build import qat_config
    from kure_jax.training.multibit import per_width_batch_stats

    runners = {}
    for name, config in configs:
        dataset = get_dataset(config.dataset, **config.dataset_options.to_dict())
        model = build_model(config, axis_name=None)
        spe = dataset.num_train_examples // config.batch_size
        tx = make_optimizer(config, make_schedule(config, steps_per_epoch=spe, num_steps=spe))
        batches = list(itertools.islice(dataset.train_batches(  # an endless iterator
            seed=0, start_step=0, global_batch_size=config.batch_size), 4))
        state = create_train_state(model, rng=jax.random.key(0), input_shape=dataset.image_shape,
                                   tx=tx, qat=qat_config(config),
                                   sample_images=batches[0]["image"])
        spec = step_config(config, model, dataset.image_shape, axis_name=None)
        if spec.bn_per_bits:
            state = state.replace(batch_stats=per_width_batch_stats(state.batch_stats,
                                                                    spec.qat_bits))
        step = jax.jit(make_train_step(model, spec))
        runners[name] = {"state": state, "step": step, "batches": batches, "rounds": []}

    def run(r: dict, n: int) -> float:
        state = r["state"]
        t0 = time.perf_counter()
        for i in range(n):
            state, metrics = r["step"](state, r["batches"][i % len(r["batches"])])
        jax.block_until_ready((state, metrics))
        r["state"] = state
        return (time.perf_counter() - t0) / n

    for r in runners.values():
        run(r, 2)
    for _ in range(rounds):
        for r in runners.values():
            r["rounds"].append(run(r, steps))
    return {name: {"step_s": min(r["rounds"]), "rounds": r["rounds"]}
            for name, r in runners.items()}


def _group_mean(data: Mapping[str, Any], group: str, **match: Any) -> dict[Any, float]:
    """``{weight_bits: mean accuracy over the group's checkpoints}`` of matching points."""
    per: dict[Any, list[float]] = {}
    for p in data["points"]:
        if p["group"] == group and all(p.get(k) == v for k, v in match.items()):
            per.setdefault(p["weight_bits"], []).append(p["accuracy"])
    return {k: float(np.mean(v)) for k, v in per.items()}


def cost_markdown(timing: Mapping[str, Any], steps: Mapping[str, int]) -> str:
    """The training-cost table: step time, steps/s relative to ``baseline``, run lengths and
    the step time x steps of a whole run relative to ``baseline``'s."""
    base = timing["baseline"]["step_s"]
    lines = ["| recipe | step time (ms) | steps/s vs baseline | training steps | "
             "steps x step time vs baseline |", "|---|---|---|---|---|"]
    for name, t in timing.items():
        total = t["step_s"] * steps[name] / (base * steps["baseline"])
        lines.append(f"| {name} | {1000 * t['step_s']:.0f} | {base / t['step_s']:.2f} | "
                     f"{steps[name]} | {total:.2f} |")
    return "\n".join(lines)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "runs/multibit", "root of the runs", flag_values=fv)
    flags.DEFINE_integer("seeds", 1, "seeds per recipe (0, 1, ...)", flag_values=fv)
    flags.DEFINE_string("recipes", ",".join(RECIPES),
                        "comma-separated subset of " + ", ".join(RECIPES), flag_values=fv)
    flags.DEFINE_string("configs", str(ROOT / "configs"), "configs directory", flag_values=fv)
    flags.DEFINE_string("sweep", None, "sweep file (default: sweeps/multibit.py)",
                        flag_values=fv)
    flags.DEFINE_integer("timing_steps", 20, "timed steps per round", flag_values=fv)
    flags.DEFINE_integer("timing_rounds", 5, "interleaved timing rounds", flag_values=fv)
    flags.DEFINE_boolean("train_only", False, "train, do not time or sweep", flag_values=fv)
    flags.DEFINE_boolean("timing", True, "time the training steps (--notiming reuses "
                         "WORKDIR/eval/timing.json)", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "progress bars", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_flags(argv, _define_flags, prog="scripts/multibit_compare.py",
                       description=__doc__.splitlines()[0])
    logging.getLogger("absl").setLevel(logging.ERROR)
    from kure_jax.evaluation import Sweep, run_sweep
    from kure_jax.evaluation.cli import load_sweep_file
    from kure_jax.evaluation.report import markdown_report
    from kure_jax.training import train_and_evaluate

    configs = pathlib.Path(args.configs)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        print(f"error: unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}",
              file=sys.stderr)
        return 2
    root = pathlib.Path(args.workdir)
    out = root / "eval"
    checkpoints, wall, steps = [], {}, {}
    for seed in range(args.seeds):
        for recipe in recipes:
            workdir = root / f"{recipe}_s{seed}"
            config = recipe_config(configs, recipe, seed)
            fresh = not (workdir / "checkpoints").exists()
            t0 = time.perf_counter()
            result = train_and_evaluate(config, workdir)
            seconds = time.perf_counter() - t0
            steps[recipe] = int(result.state.step)
            if fresh:
                wall.setdefault(recipe, []).append(seconds)
            print(f"trained {workdir}: test accuracy {100 * result.eval_metrics['accuracy']:.1f}%"
                  f" at step {steps[recipe]} ({seconds:.0f} s{'' if fresh else ', reused'})",
                  flush=True)
            checkpoints.append(f"{recipe}={workdir}")
    if args.train_only:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    timing = None
    if not args.timing and (out / "timing.json").exists():  # an earlier run's measurement
        timing = json.loads((out / "timing.json").read_text())["timing"]
    elif args.timing:
        t0 = time.perf_counter()
        timing = time_train_steps([(r, recipe_config(configs, r, 0)) for r in recipes],
                                  steps=args.timing_steps, rounds=args.timing_rounds)
        (out / "timing.json").write_text(json.dumps(
            {"timing": timing, "training_wall_s": wall, "training_steps": steps,
             "timing_steps": args.timing_steps, "timing_rounds": args.timing_rounds},
            indent=1) + "\n")
        print(f"timed the training steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    spec = Sweep.from_config(load_sweep_file(args.sweep or configs / "sweeps" / "multibit.py"))
    t0 = time.perf_counter()
    data = run_sweep(checkpoints, spec, out, progress=False if not args.progress else None)
    print(f"swept {len(checkpoints)} checkpoints, {len(data['points'])} points "
          f"({time.perf_counter() - t0:.0f} s); report: {out / 'report.md'}\n")
    report = markdown_report(data)
    start = report.find("### One model at every width")
    if start >= 0:
        print(report[start:report.find("\n###", start + 1)].strip() + "\n")
    if timing is not None and "baseline" in timing:
        print(cost_markdown(timing, steps))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue", file=sys.stderr)
        raise SystemExit(130) from None
