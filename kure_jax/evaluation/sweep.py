"""A sweep: its validated config (:class:`Sweep`) and its plan for one model (:func:`plan_sweep`).

A sweep config is an ``ml_collections.ConfigDict`` (``configs/sweeps/default.py`` documents
every key) or a nested mapping: the engine settings ``layers``, ``eval_batch_size`` and
``map_chunk``, a ``report`` section, and one section per family of points (the registry
:data:`kure_jax.evaluation.families.FAMILIES`). A family runs when its section is present;
a key a section leaves out takes the family's default. :meth:`Sweep.from_config` checks it all
before any model is touched: an unknown key or section is a ``ValueError`` naming the closest
keys, a bad value one naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kure_jax.evaluation import _checks
from kure_jax.evaluation._types import Context, Target, Task
from kure_jax.evaluation.families import FAMILIES
from kure_jax.evaluation.forward import classifier_apply, make_eval_step
from kure_jax.evaluation.layers import target_layers
from kure_jax.evaluation.parallel import EvalMesh
from kure_jax.selection import LayerRule, as_rule

__all__ = ["ReportConfig", "Sweep", "Target", "Task", "plan_sweep", "test_batches"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """``config.report``: ``histogram_layers`` (weight histograms of the first N quantised
    layers) and ``plots`` (write the PNG plots)."""

    histogram_layers: int = 3
    plots: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "histogram_layers", _checks.integer(
            self.histogram_layers, "report.histogram_layers", 0))
        _checks.boolean(self.plots, "report.plots")


_SETTINGS = ("layers", "eval_batch_size", "map_chunk", "report")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
    """Everything a sweep evaluates, per model.

    Attributes:
      layers: which conv/dense kernels are quantised (and whose inputs, for W/A):
        ``"paper"``, ``"kernels"`` or a ``kure_jax.selection.LayerRule`` (read by
        :func:`kure_jax.selection.as_rule`).
      eval_batch_size: test images per forward pass (global, over all devices).
      map_chunk: points per vectorised chunk of a mapped sweep (step ratios, stochastic
        seeds); ``1`` runs them as a compiled loop (``lax.map``), larger values ``vmap`` that
        many points at once (faster on accelerators; on CPU a vmapped conv over per-point
        kernels is a slow grouped convolution).
      report: :class:`ReportConfig`.
      families: section name -> that family's validated config, for the sections present,
        in the registry's order.

    Raises:
      ValueError: on construction for an invalid setting, naming the key.
    """

    layers: str | LayerRule = "paper"
    eval_batch_size: int = 1000
    map_chunk: int = 1
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    families: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            as_rule(self.layers)
        except ValueError as err:
            raise ValueError(f"sweep key 'layers': {err}") from None
        for name in ("eval_batch_size", "map_chunk"):
            object.__setattr__(self, name, _checks.integer(getattr(self, name), name, 1))
        unknown = [name for name in self.families if name not in FAMILIES]
        if unknown:
            raise _checks.unknown_key(unknown[0], FAMILIES)
        object.__setattr__(self, "families", {name: self.families[name] for name in FAMILIES
                                              if name in self.families})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Sweep:
        """Validates a sweep config (a ``ConfigDict`` or nested mapping).

        Raises:
          ValueError: for an unknown key or section (naming the closest ones) or any invalid
            value (naming the key).
        """
        config = _checks.as_dict(config)
        for key in config:
            if key not in _SETTINGS and key not in FAMILIES:
                raise _checks.unknown_key(key, [*_SETTINGS, *FAMILIES])
        families = {name: family.parse(config[name], config)
                    for name, family in FAMILIES.items() if name in config}
        report = _checks.build(ReportConfig, config.get("report", {}), "report")
        settings = {k: config[k] for k in ("layers", "eval_batch_size", "map_chunk")
                    if k in config}
        return cls(**settings, report=report, families=families)

    def to_dict(self) -> dict[str, Any]:
        """The sweep as a JSON-ready nested dict with the config's keys (``results.json``)."""
        out: dict[str, Any] = {
            "layers": self.layers if isinstance(self.layers, str)
            else dataclasses.asdict(self.layers),
            "eval_batch_size": self.eval_batch_size, "map_chunk": self.map_chunk,
            "report": dataclasses.asdict(self.report)}
        for name, cfg in self.families.items():
            out[name] = _jsonable(dataclasses.asdict(cfg))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def test_batches(dataset: Any, batch_size: int, mesh: EvalMesh | None) -> Any:
    """``() -> iterator`` over this process's share of the test split's global batches of
    ``batch_size`` rows (``dataset.eval_batches``; with one process, all of each batch)."""
    if mesh is None or mesh.process_count == 1:
        return lambda: dataset.eval_batches(global_batch_size=batch_size)
    return lambda: dataset.eval_batches(global_batch_size=batch_size,
                                        process_index=mesh.process_index,
                                        process_count=mesh.process_count)


def plan_sweep(target: Target, sweep: Sweep, *, mesh: EvalMesh | None = None) -> list[Task]:
    """Every task of ``sweep`` for ``target``, family by family; nothing is evaluated yet.

    Compiled programs are shared between tasks: the float forward pass is compiled once and
    reused by every weight-only point, and each mapped sweep is one program. With ``mesh``
    every forward pass (and the activation calibration) runs with the batch sharded over its
    devices and the variables replicated; the global eval batch is ``sweep.eval_batch_size``
    rounded up to a multiple of ``mesh.row_multiple``, and with several processes each reads
    its share of it. The points equal one device's to float32 rounding, and bit for bit with
    ``mesh.micro_batch`` set (see :mod:`kure_jax.evaluation.parallel`).

    Raises:
      ValueError: if ``sweep.layers`` selects nothing in the model, the model cannot be
        traced with the dataset's image shape, or a QAT target has no Linen ``model``.
      RuntimePackageError: if a real runtime of the sweep lacks its package.
    """
    batch_size = sweep.eval_batch_size if mesh is None else mesh.global_batch_size(
        sweep.eval_batch_size)
    where, names = target_layers(target, sweep.layers)
    if mesh is not None:  # placed once: every task's programs take them as they are
        widths = target.widths and {b: (q, mesh.replicate(stats))
                                    for b, (q, stats) in target.widths.items()}
        target = dataclasses.replace(target, variables=mesh.replicate(target.variables),
                                     widths=widths)
    apply_fp = classifier_apply(target.model) if target.apply_fn is None else target.apply_fn
    ctx = Context(target=target,
                  float_vars={k: v for k, v in target.variables.items() if k != "quant"},
                  apply_fp=apply_fp, fp_step=make_eval_step(apply_fp, mesh=mesh),
                  batches=test_batches(target.dataset, batch_size, mesh), where=where,
                  layer_names=names, mesh=mesh, batch_size=batch_size,
                  map_chunk=sweep.map_chunk, configs=sweep.families)
    return [task for name, cfg in sweep.families.items()
            for task in FAMILIES[name].plan(ctx, cfg)]
