"""Eval throughput of the robustness sweep on 1 vs N devices (data-parallel ``EvalMesh``).

Question: what does sharding the test batch over the devices buy, and what would the default
sweep cost on ImageNet? Results in BENCHMARKS.md ("eval.py on several devices"). Run:

    python benchmarks/eval_devices.py --checkpoint runs/mnist5k_kure [--devices 1 8] \\
        [--sweep configs/sweeps/tiny.py] [--repeats 2] [--micro_batch M]

On CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before
JAX is imported): they share the machine's cores, so this measures the overhead of the sharded
programs rather than a speed-up. Each device count runs the whole sweep ``--repeats`` times,
alternating with the others (the first run of each includes compilation; the table reports
the fastest run), and the script checks that all runs give the same accuracies.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a train.py workdir or checkpoint")
    parser.add_argument("--sweep", default="configs/sweeps/tiny.py")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro_batch", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(args.devices)}")
    import jax

    from kure_jax.evaluation import EvalMesh, Sweep, run_sweep
    from kure_jax.evaluation.cli import load_sweep_file

    spec = Sweep.from_config(load_sweep_file(args.sweep))
    runs: dict[int, list[tuple[float, dict]]] = {n: [] for n in args.devices}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for n in args.devices:
                mesh = EvalMesh(jax.devices()[:n], micro_batch=args.micro_batch)
                start = time.perf_counter()
                data = run_sweep([args.checkpoint], spec, out, progress=False, mesh=mesh)
                runs[n].append((time.perf_counter() - start, data))
    accuracies = {tuple(p["accuracy"] for p in d["points"]) for r in runs.values() for _, d in r}
    if len(accuracies) != 1 and args.micro_batch is not None:
        raise RuntimeError("runs with the same micro_batch gave different accuracies")
    print(f"{jax.devices()[0].platform} x{len(jax.devices())} ({os.cpu_count()} cores), "
          f"sweep {args.sweep}, micro_batch {args.micro_batch}")
    print("| devices | points | sweep s (fastest) | images/s (all points) | first run s |")
    print("|---|---|---|---|---|")
    for n, results in runs.items():
        seconds, data = min(results, key=lambda r: r[0])
        images = sum(p["count"] for p in data["points"])
        print(f"| {n} | {len(data['points'])} | {seconds:.1f} | {images / seconds:,.0f} | "
              f"{results[0][0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
