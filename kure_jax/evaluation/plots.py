"""PNG plots of a sweep (matplotlib, Agg backend: no display needed): every family's plots
(:data:`kure_jax.evaluation.families.FAMILIES`), the weight kurtosis and weight histograms.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from kure_jax.evaluation import _plotting, _tables
from kure_jax.evaluation.families import FAMILIES

__all__ = ["plot_kurtosis", "plot_weight_histograms", "write_plots"]


def plot_kurtosis(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Per-layer weight kurtosis of each checkpoint (of each group's mean when groups hold
    several checkpoints), with the uniform (1.8) and normal (3) values marked."""
    ckpts = [c for c in data["checkpoints"] if c["kurtosis"]]
    if not ckpts:
        return None
    layers = list(dict.fromkeys(k for c in ckpts for k in c["kurtosis"]))
    if _tables.grouped(data):
        groups: dict[str, list[dict]] = {}
        for c in ckpts:
            groups.setdefault(c["group"], []).append(c["kurtosis"])
        ckpts = [{"label": g, "kurtosis": {layer: float(np.mean([k[layer] for k in ks]))
                                          for layer in layers if all(layer in k for k in ks)}}
                 for g, ks in groups.items()]
    fig, (ax,) = _plotting.grid(1, size=(max(4.5, 0.9 * len(layers) + 2), 3.0))
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
    return _plotting.save(fig, path)


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
    plt = _plotting.pyplot()
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
    return _plotting.save(fig, path)


def write_plots(
    data: Mapping[str, Any],
    out_dir: str | pathlib.Path,
    *,
    weights: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> list[pathlib.Path]:
    """Writes every plot the results allow into ``out_dir``; returns the files written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [path for family in FAMILIES.values() if family.plot is not None
               for path in family.plot(data, out)]
    written += [plot_kurtosis(data, out / "kurtosis.png"),
                plot_weight_histograms(weights or {}, out / "weight_histograms.png")]
    return [p for p in written if p is not None]
