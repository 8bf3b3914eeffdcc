"""``make demo``: train the mnist5k baseline and KURE models, sweep both, print the comparison.

    python scripts/demo.py                                    # 1 seed: 2-6 min on 2 CPU cores
    python scripts/demo.py --seeds 3 --qat --dorefa --ablation  # docs/results.md
    python scripts/demo.py --sweep configs/sweeps/runtimes.py --out runs/demo/eval_runtimes
                                                    # make demo-runtimes: LiteRT, ONNX Runtime

Trains each recipe with ``kure_jax.training.train_and_evaluate`` into ``WORKDIR/<recipe>_s<seed>``
(an existing finished run is reused: training resumes from its last checkpoint), runs the sweep
(``configs/sweeps/default.py``) over all of them with ``run_sweep`` into ``WORKDIR/eval``, then
prints the summary table (means over seeds) and checks the issue's claims for KURE vs baseline.
A program, not part of the library: it uses only public ``kure_jax.training`` and
``kure_jax.evaluation`` functions (``tests/test_kure_demo.py`` runs it on tiny configs).

Recipes (group names in the report):

* ``baseline``: ``configs/mnist5k_baseline.py`` (lambda 0); ``kure``: ``configs/mnist5k_kure.py``.
* ``--qat``: ``qat_baseline`` / ``qat_kure``: ``configs/mnist5k_qat_w4a4.py`` (LSQ W4A4) with
  lambda 0 / 1.
* ``--dorefa``: ``dorefa_baseline`` / ``dorefa_kure``: the same W4A4 QAT with DoReFa weight and
  activation quantizers (the paper's QAT robustness experiment), on ``small_cnn`` with
  ``hidden_norm=True``: DoReFa kernels are scale-free, so every quantised layer needs a
  BatchNorm after it (see ``kure_jax.models.small``).
* ``--ablation``: ``kure_kt3`` / ``kure_kt4``: KURE with target K_T = 3 / 4 (``kure`` is 1.8).
"""

from __future__ import annotations

import logging
import pathlib
import runpy
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from kure_jax.evaluation import Sweep, run_sweep, summary_table
from kure_jax.evaluation.cli import load_sweep_file
from kure_jax.evaluation.families.runtimes import runtimes_table
from kure_jax.training import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the config files import their shared base (`configs.base`)
    sys.path.insert(0, str(ROOT))

_DOREFA = {"qat.weight_quantizer": "dorefa", "qat.act_quantizer": "dorefa",
           "model_options.hidden_norm": True}
# recipe -> (config file, overrides)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("mnist5k_baseline.py", {}),
    "kure": ("mnist5k_kure.py", {}),
    "qat_baseline": ("mnist5k_qat_w4a4.py", {"kure.lambda_": 0.0}),
    "qat_kure": ("mnist5k_qat_w4a4.py", {}),
    "dorefa_baseline": ("mnist5k_qat_w4a4.py", {"kure.lambda_": 0.0, **_DOREFA}),
    "dorefa_kure": ("mnist5k_qat_w4a4.py", _DOREFA),
    "kure_kt3": ("mnist5k_kure.py", {"kure.target": 3.0}),
    "kure_kt4": ("mnist5k_kure.py", {"kure.target": 4.0}),
}


def _mean(data: Mapping[str, Any], group: str, kind: str, pick) -> float | None:
    """Mean over the group's checkpoints of ``pick(points of one checkpoint)``."""
    labels = [c["label"] for c in data["checkpoints"] if c["group"] == group]
    values = []
    for label in labels:
        points = [p for p in data["points"] if p["checkpoint"] == label and p["kind"] == kind]
        value = pick(points) if points else None
        if value is not None:
            values.append(value)
    return float(np.mean(values)) if values else None


def claims(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's acceptance numbers, KURE vs baseline, each the mean over the seeds.

    Returns:
      One dict per claim with ``claim``, ``kure``, ``baseline``, ``difference`` (points),
      ``required`` (a string such as ``">= +20"``) and ``holds`` (bool, or None when a group
      is missing). The QAT claim is checked for the LSQ pair and, if run, the DoReFa pair.
    """
    fp = lambda pts: pts[0]["accuracy"]
    w2 = lambda pts: next((p["accuracy"] for p in pts if p["quantizer"] == "max"
                           and p["weight_bits"] == 2), None)
    ratio3 = lambda pts: min((p["accuracy"] for p in pts if p["weight_bits"] == 3), default=None)
    qat3 = lambda pts: next((p["accuracy"] for p in pts if p["weight_bits"] == 3), None)
    specs = [
        ("FP accuracy kept", "fp", fp, "kure", "baseline", lambda d: abs(d) <= 0.5, "within ±0.5"),
        ("W2 per-tensor max-abs PTQ", "weight", w2, "kure", "baseline", lambda d: d >= 20,
         ">= +20"),
        ("worst over step ratios 0.7..1.3, W3", "step_ratio", ratio3, "kure", "baseline",
         lambda d: d >= 5, ">= +5"),
        ("W4A4-QAT (LSQ) model evaluated at W3", "qat_bits", qat3, "qat_kure", "qat_baseline",
         lambda d: d >= 10, ">= +10"),
        ("W4A4-QAT (DoReFa) model evaluated at W3", "qat_bits", qat3, "dorefa_kure",
         "dorefa_baseline", lambda d: d >= 10, ">= +10"),
    ]
    out = []
    for name, kind, pick, kure, base, test, required in specs:
        a, b = _mean(data, kure, kind, pick), _mean(data, base, kind, pick)
        diff = None if a is None or b is None else 100 * (a - b)
        out.append({"claim": name, "kure": a, "baseline": b, "difference": diff,
                    "required": required, "holds": None if diff is None else bool(test(diff))})
    return out


def claims_markdown(data: Mapping[str, Any]) -> str:
    """:func:`claims` as a markdown table (accuracies in %); claims whose groups were not run
    are listed below it."""
    seeds = {g: sum(c["group"] == g for c in data["checkpoints"])
             for g in ("kure", "baseline", "qat_kure", "qat_baseline", "dorefa_kure",
                       "dorefa_baseline")}
    shown = ", ".join(f"{g} {n}" for g, n in seeds.items() if n)
    lines = [f"Checkpoints (seeds) per group: {shown}.", "",
             "| claim | KURE | baseline | difference (points) | required | holds |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"
    skipped = []
    for c in claims(data):
        if c["holds"] is None:
            skipped.append(c["claim"])
            continue
        diff = f"{c['difference']:+.1f}"
        holds = "yes" if c["holds"] else "**no**"
        lines.append(f"| {c['claim']} | {fmt(c['kure'])} | {fmt(c['baseline'])} | {diff} | "
                     f"{c['required']} | {holds} |")
    if skipped:
        lines += ["", f"Not run (add --qat / --dorefa): {'; '.join(skipped)}."]
    return "\n".join(lines)


def _config(config_path: pathlib.Path, overrides: Mapping[str, Any], seed: int):
    """The training config of a recipe: the file's ``get_config()`` plus the overrides."""
    config = runpy.run_path(str(config_path))["get_config"]()
    config.seed = seed
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _train(config_path: pathlib.Path, overrides: Mapping[str, Any], seed: int,
           workdir: pathlib.Path) -> float:
    config = _config(config_path, overrides, seed)
    return train_and_evaluate(config, workdir).eval_metrics["accuracy"]


def _flags(argv: Sequence[str]) -> flags.FlagValues:
    """The demo's absl flags, parsed from ``argv`` (without the program name)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", "runs/demo", "Where the runs go.", flag_values=fv)
    flags.DEFINE_integer("seeds", 1, "Seeds per recipe (0, 1, ...).", flag_values=fv)
    flags.DEFINE_bool("qat", False, "Add the W4A4 QAT pair.", flag_values=fv)
    flags.DEFINE_bool("dorefa", False, "Add the W4A4 DoReFa QAT pair.", flag_values=fv)
    flags.DEFINE_bool("ablation", False, "Add K_T = 3 and 4.", flag_values=fv)
    flags.DEFINE_string("configs", str(ROOT / "configs"),
                        "Directory of the configs (default: the repository's).", flag_values=fv)
    flags.DEFINE_string("sweep", None, "Sweep file (default: CONFIGS/sweeps/default.py).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Sweep output (default: WORKDIR/eval).", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show the sweep's progress bar (on a terminal).",
                      flag_values=fv)
    fv(["demo.py", *argv])
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _flags(sys.argv[1:] if argv is None else argv)
        configs = pathlib.Path(args.configs)
        spec = Sweep.from_config(load_sweep_file(args.sweep or configs / "sweeps" / "default.py"))
    except (flags.Error, ValueError) as err:  # UsageError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's per-checkpoint chatter
    recipes = ["baseline", "kure"] + (["qat_baseline", "qat_kure"] if args.qat else []) + (
        ["dorefa_baseline", "dorefa_kure"] if args.dorefa else []) + (
        ["kure_kt3", "kure_kt4"] if args.ablation else [])
    root = pathlib.Path(args.workdir)
    checkpoints = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        for recipe in recipes:
            config_file, overrides = RECIPES[recipe]
            workdir = root / f"{recipe}_s{seed}"
            t0 = time.perf_counter()
            accuracy = _train(configs / config_file, overrides, seed, workdir)
            print(f"trained {workdir}: test accuracy {100 * accuracy:.1f}% "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            checkpoints.append(f"{recipe}={workdir}")
    t0 = time.perf_counter()
    out = pathlib.Path(args.out) if args.out else root / "eval"
    data = run_sweep(checkpoints, spec, out, progress=None if args.progress else False)
    print(f"swept {len(checkpoints)} checkpoints, {len(data['points'])} points "
          f"({time.perf_counter() - t0:.0f} s); report: {out / 'report.md'}\n")
    print(summary_table(data, by_group=True))
    runtimes = runtimes_table(data, by_group=True)
    if runtimes is not None:  # configs/sweeps/runtimes.py (make demo-runtimes)
        print("\nreal integer runtimes:\n" + runtimes)
    print()
    print(claims_markdown(data))
    kurt = {g: np.mean([np.mean(list(c["kurtosis"].values())) for c in data["checkpoints"]
                        if c["group"] == g]) for g in dict.fromkeys(recipes)}
    print("\nmean kurtosis of the quantised layers: "
          + ", ".join(f"{g} {k:.2f}" for g, k in kurt.items()))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def _main_interruptible() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished trainings are reused,"
              " an interrupted one resumes from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(_main_interruptible())
