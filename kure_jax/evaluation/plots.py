"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

Each function takes parsed ``results.json`` data (and, for histograms, weight arrays), writes
one file and returns its path, or ``None`` when the results hold nothing to plot.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from kure_jax.evaluation.report import accuracy_table

__all__ = [
    "plot_accuracy_vs_bits",
    "plot_kurtosis",
    "plot_nested_bits",
    "plot_qat_bits",
    "plot_step_ratio",
    "plot_weight_histograms",
    "write_plots",
]

_DPI = 90


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _grouped(data: Mapping[str, Any]) -> bool:
    groups = [c["group"] for c in data["checkpoints"]]
    return len(set(groups)) < len(groups)


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    return path


def _grid(n: int, size: tuple[float, float] = (3.4, 2.7)):
    plt = _pyplot()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_accuracy_vs_bits(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Weight-only PTQ accuracy vs bit width, one panel per quantizer, one line per model
    (group means when groups hold several checkpoints); the float accuracy dotted."""
    by_group = _grouped(data)
    weight = accuracy_table(data, by_group=by_group, kind="weight")
    fp = accuracy_table(data, by_group=by_group, kind="fp")
    quantizers = list(dict.fromkeys(k[0] for t in weight.values() for k in t))
    if not quantizers:
        return None
    fig, axes = _grid(len(quantizers))
    for ax, q in zip(axes, quantizers, strict=True):
        for i, (name, table) in enumerate(weight.items()):
            pts = sorted((k[1], v) for k, v in table.items() if k[0] == q)
            color = f"C{i}"
            ax.plot([b for b, _ in pts], [100 * v for _, v in pts], "o-", color=color,
                    label=name, ms=3)
            if name in fp:
                ax.axhline(100 * next(iter(fp[name].values())), color=color, ls=":", lw=1)
        ax.set_title(q, fontsize=9)
        ax.set_xticks(sorted({k[1] for t in weight.values() for k in t if k[0] == q}))
        ax.set_xlabel("weight bits")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_step_ratio(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Accuracy vs step-size ratio r, one panel per (kind, bit width), one line per model."""
    by_group = _grouped(data)
    panels = []
    for kind, label in (("step_ratio", "PTQ"), ("qat_step_ratio", "QAT learned step")):
        table = accuracy_table(data, by_group=by_group, kind=kind)
        for b in sorted({k[1] for t in table.values() for k in t}, reverse=True):
            panels.append((f"{label}, W{b}", table, b))
    if not panels:
        return None
    fig, axes = _grid(len(panels), size=(4.0, 2.8))
    for ax, (title, table, b) in zip(axes, panels, strict=True):
        for name, t in table.items():
            pts = sorted((k[3], v) for k, v in t.items() if k[1] == b)
            if pts:
                ax.plot([r for r, _ in pts], [100 * v for _, v in pts], label=name, lw=1.3)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step ratio r (step × r)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_qat_bits(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """QAT checkpoints re-quantised at other weight bit widths."""
    table = accuracy_table(data, by_group=_grouped(data), kind="qat_bits")
    if not table:
        return None
    fig, (ax,) = _grid(1, size=(4.5, 3.0))
    for name, t in table.items():
        pts = sorted((k[1], v) for k, v in t.items())
        ax.plot([b for b, _ in pts], [100 * v for _, v in pts], "o-", label=name, ms=3)
    ax.set_xlabel("weight bits (QAT quantizer, activations as trained)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_nested_bits(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """The ``nested`` section: accuracy vs weight bits, one colour per model: re-quantised
    (solid), sliced from the int8 codes (dashed), and the trained widths of QAT checkpoints
    as trained (crosses)."""
    by_group = _grouped(data)
    curves = {kind: accuracy_table(data, by_group=by_group, kind=kind)
              for kind in ("nested_requant", "nested_slice", "qat")}
    names = list(dict.fromkeys([*curves["nested_requant"], *curves["nested_slice"]]))
    if not names:
        return None
    fig, (ax,) = _grid(1, size=(6.0, 3.8))
    for i, name in enumerate(names):
        for kind, style, label in (("nested_requant", "o-", "re-quantised"),
                                   ("nested_slice", "s--", "int8 sliced"),
                                   ("qat", "x", "as trained")):
            pts = sorted((k[1], v) for k, v in curves[kind].get(name, {}).items()
                         if k[1] is not None)
            if pts:
                ax.plot([b for b, _ in pts], [100 * v for _, v in pts], style, color=f"C{i}",
                        ms=6 if kind == "qat" else 3, mew=1.5, lw=1.2,
                        label=f"{name}, {label}")
    bits = sorted({k[1] for kind in ("nested_requant", "nested_slice")
                   for t in curves[kind].values() for k in t})
    ax.set_xticks(bits)
    ax.set_xlabel("weight bits (min-max per channel, activations float)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_kurtosis(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Per-layer weight kurtosis of each checkpoint (of each group's mean when groups hold
    several checkpoints), with the uniform (1.8) and normal (3) values marked."""
    ckpts = [c for c in data["checkpoints"] if c["kurtosis"]]
    if not ckpts:
        return None
    layers = list(dict.fromkeys(k for c in ckpts for k in c["kurtosis"]))
    if _grouped(data):
        groups: dict[str, list[dict]] = {}
        for c in ckpts:
            groups.setdefault(c["group"], []).append(c["kurtosis"])
        ckpts = [{"label": g, "kurtosis": {layer: float(np.mean([k[layer] for k in ks]))
                                          for layer in layers if all(layer in k for k in ks)}}
                 for g, ks in groups.items()]
    fig, (ax,) = _grid(1, size=(max(4.5, 0.9 * len(layers) + 2), 3.0))
    width = 0.8 / len(ckpts)
    x = np.arange(len(layers))
    for i, c in enumerate(ckpts):
        values = [c["kurtosis"].get(layer, np.nan) for layer in layers]
        ax.bar(x + (i - (len(ckpts) - 1) / 2) * width, values, width, label=c["label"])
    ax.axhline(1.8, color="k", lw=0.8, ls="--", label="uniform 1.8")
    ax.axhline(3.0, color="k", lw=0.8, ls=":", label="normal 3")
    ax.set_xticks(x, [layer.replace("/kernel", "") for layer in layers], rotation=30,
                  fontsize=7, ha="right")
    ax.set_ylabel("kurtosis")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_weight_histograms(
    weights: Mapping[str, Mapping[str, np.ndarray]], path: pathlib.Path
) -> pathlib.Path | None:
    r"""Weight histograms (rows: checkpoints, columns: layers) with the moment-matched normal
    :math:`N(\mu, \sigma^2)` and uniform :math:`U(\mu - \sqrt{3}\sigma, \mu + \sqrt{3}\sigma)`
    densities overlaid.

    Args:
      weights: checkpoint label -> layer name -> weight array.
    """
    rows = [(label, layers) for label, layers in weights.items() if layers]
    if not rows:
        return None
    plt = _pyplot()
    cols = max(len(layers) for _, layers in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.0 * cols, 2.3 * len(rows)),
                             squeeze=False)
    for r, (label, layers) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(layers):
                ax.set_visible(False)
                continue
            name, w = list(layers.items())[c]
            w = np.asarray(w, np.float64).ravel()
            mu, sigma = float(w.mean()), float(w.std()) or 1e-12
            ax.hist(w, bins=60, density=True, color="0.75")
            grid = np.linspace(w.min(), w.max(), 200)
            normal = np.exp(-0.5 * ((grid - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            half = math.sqrt(3) * sigma
            uniform = np.where(np.abs(grid - mu) <= half, 1 / (2 * half), 0.0)
            ax.plot(grid, normal, "C0", lw=1.2, label="normal fit")
            ax.plot(grid, uniform, "C3", lw=1.2, label="uniform fit")
            kurt = float(np.mean((w - mu) ** 4) / sigma**4)
            ax.set_title(f"{label}: {name.replace('/kernel', '')} (kurt {kurt:.2f})", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.locator_params(axis="x", nbins=5)
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


def write_plots(
    data: Mapping[str, Any],
    out_dir: str | pathlib.Path,
    *,
    weights: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> list[pathlib.Path]:
    """Writes every plot the results allow into ``out_dir``; returns the files written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_accuracy_vs_bits(data, out / "accuracy_vs_bits.png"),
        plot_step_ratio(data, out / "accuracy_vs_step_ratio.png"),
        plot_qat_bits(data, out / "qat_bits.png"),
        plot_nested_bits(data, out / "nested_bits.png"),
        plot_kurtosis(data, out / "kurtosis.png"),
        plot_weight_histograms(weights or {}, out / "weight_histograms.png"),
    ]
    return [p for p in written if p is not None]
