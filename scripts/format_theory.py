"""The best kurtosis target per data type, from theory: the table and plot of docs/formats.md.

    python scripts/format_theory.py --out_png docs/img/formats_theory.png

For each data type (the presets of :mod:`kure_jax.quant.formats`, plus INT4 per tensor and per
output channel for comparison) it computes, with :func:`kure_jax.theory.format_snr_db`, the
SNR of a unit-variance generalised-Gaussian tensor at kurtosis 1.8 (uniform), 2.4, 3 (normal),
4 and 6 (Laplace), and the kurtosis in [1.8, 6] that maximises it
(:func:`kure_jax.theory.best_kurtosis`). Per-tensor scales are groups of ``--tensor_size``
values, per-channel ones groups of ``--channel_size`` (a 3x3x64 conv kernel's fan-in: 576).

A program, not part of the library: it uses only public ``kure_jax.theory`` and
``kure_jax.quant.formats`` functions.
"""

from __future__ import annotations

import math
import time

import numpy as np
from absl import app, flags

from kure_jax import theory
from kure_jax.quant import formats

_TENSOR_SIZE = flags.DEFINE_integer("tensor_size", 65536, "Values per per-tensor scale.")
_CHANNEL_SIZE = flags.DEFINE_integer("channel_size", 576, "Values per per-channel scale.")
_OUT_MD = flags.DEFINE_string("out_md", None, "Write the Markdown table here (else print).")
_OUT_PNG = flags.DEFINE_string("out_png", None, "Write the SNR-vs-kurtosis plot here.")
_KURTOSES = (1.8, 2.4, 3.0, 4.0, 6.0)


def rows(tensor_size: int, channel_size: int) -> list[tuple[str, formats.Format, int]]:
    """``(label, format, group size)`` for every preset plus the integer references."""
    out = [("int4 per-tensor", formats.Format(element="int4", granularity="tensor",
                                              block_size=None), tensor_size),
           ("int4 per-channel", formats.Format(element="int4", granularity="channel",
                                               block_size=None), channel_size)]
    for name, fmt in formats.PRESETS.items():
        out.append((name, fmt, fmt.block_size or tensor_size))
    return out


def compute(tensor_size: int, channel_size: int) -> list[dict]:
    """One dict per row: label, element, scale rule, group size, SNRs, best kurtosis."""
    results = []
    for label, fmt, group in rows(tensor_size, channel_size):
        kw = {"levels": formats.element_levels(fmt.element), "block_size": group,
              "scale_rule": fmt.scale}
        snrs = [theory.format_snr_db(k, **kw) for k in _KURTOSES]
        best, mse = theory.best_kurtosis(**kw)
        curve_k = np.linspace(1.8, 6.0, 22)
        curve = [theory.format_snr_db(float(k), **kw) for k in curve_k]
        results.append({"label": label, "element": fmt.element, "rule": fmt.scale,
                        "group": group, "snr": snrs, "best": best,
                        "best_snr": -10 * math.log10(mse), "curve": (curve_k, curve)})
    return results


def markdown(results: list[dict]) -> str:
    head = " | ".join(f"SNR @ {k:g}" for k in _KURTOSES)
    lines = [f"| data type | element | scale | group | {head} | best kurtosis | SNR there |",
             "|---" * (6 + len(_KURTOSES)) + "|"]
    for r in results:
        snr = " | ".join(f"{s:.2f}" for s in r["snr"])
        lines.append(f"| {r['label']} | {r['element']} | {r['rule']} | {r['group']} | {snr} | "
                     f"{r['best']:.2f} | {r['best_snr']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    for r in results:
        k, snr = r["curve"]
        ax = axes[0] if r["element"] in ("fp4_e2m1", "int4", "nf4") else axes[1]
        line, = ax.plot(k, snr, label=r["label"])
        ax.plot([r["best"]], [r["best_snr"]], "o", color=line.get_color())
    for ax, title in zip(axes, ("4-bit data types", "6- and 8-bit data types"), strict=True):
        ax.set_xlabel("kurtosis of the tensor (1.8 uniform, 3 normal, 6 Laplace)")
        ax.set_ylabel("SNR (dB)")
        ax.set_title(title + " (dot: best kurtosis)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    results = compute(_TENSOR_SIZE.value, _CHANNEL_SIZE.value)
    table = markdown(results)
    if _OUT_MD.value:
        with open(_OUT_MD.value, "w") as f:
            f.write(table + "\n")
    print(table)
    if _OUT_PNG.value:
        plot(results, _OUT_PNG.value)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
