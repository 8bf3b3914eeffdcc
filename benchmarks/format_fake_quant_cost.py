"""Cost of each data type's fake-quant (forward + backward) against per-channel INT4.

Question (issue 23): does fake-quantising in a format (``kure_jax.quant.formats``) cost at most
3x the per-channel INT4 fake-quant that the rest of kure_jax uses? Results in BENCHMARKS.md
("Data-type fake-quant cost"). Run (CPU, one process):

    python benchmarks/format_fake_quant_cost.py --repeats 9 --calls 3

Each row times one jitted program that returns ``y = Q(x)`` and ``dL/dx`` for a cotangent ``g``
(``jax.vjp``), on a ``(2048, 2048)`` float32 Dense kernel (4M elements; blocks along axis 0, the
inputs). Scales are computed inside the program from ``x`` in every row (absmax per output
channel for the baseline, ``quantize(x, QuantPolicy(bits=4, axis=-1))``). The rows are
interleaved: each repeat runs every row once, so a noisy neighbour on a shared machine slows
all rows alike; the median over repeats is reported with each row's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from kure_jax.quant import formats
from kure_jax.quant.policy import QuantPolicy, quantize

BASELINE = "int4 per-channel (QuantPolicy)"


def programs() -> dict[str, object]:
    """Row name -> jitted ``(x, g) -> (Q(x), dL/dx)``."""
    def vjp_program(q):
        def run(x, g):
            y, pullback = jax.vjp(q, x)
            return y, pullback(g)[0]
        return jax.jit(run)

    rows = {BASELINE: vjp_program(lambda x: quantize(x, QuantPolicy(bits=4, axis=-1)))}
    for name in formats.PRESETS:
        rows[name] = vjp_program(lambda x, name=name: formats.fake_quant_format(x, name))
    return rows


def measure(repeats: int, calls: int, shape: tuple[int, int]) -> dict[str, list[float]]:
    """Per row, the per-call wall times (seconds) of each repeat, rows interleaved."""
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape, jnp.float32)
    g = jax.random.normal(kg, shape, jnp.float32)
    rows = programs()
    for run in rows.values():  # Compile and warm up.
        jax.block_until_ready(run(x, g))
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, run in rows.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = run(x, g)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def table(times: dict[str, list[float]]) -> str:
    """Markdown table: median ms per call, min..max, ratio to the baseline's median."""
    base = statistics.median(times[BASELINE])
    lines = ["| format | median ms | min..max ms | / int4 per-channel |", "|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f}..{max(ts) * 1e3:.1f} | "
                     f"{med / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="Interleaved repeats (median).")
    parser.add_argument("--calls", type=int, default=3, help="Back-to-back calls per repeat.")
    parser.add_argument("--rows", type=int, default=2048, help="Kernel inputs (blocked axis).")
    parser.add_argument("--cols", type=int, default=2048, help="Kernel outputs.")
    args = parser.parse_args(argv)
    times = measure(args.repeats, args.calls, (args.rows, args.cols))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, argv: {sys.argv[1:]}")
    print(table(times))


if __name__ == "__main__":
    main()
