"""The registry of point families: sweep config section name -> :class:`Family`.

Each module here is one kind of point (or a few related kinds): it owns its config section
(``config.<name>`` of a sweep config: a frozen dataclass validated from it), plans its tasks
and renders its tables and plots. The planner (:func:`kure_jax.evaluation.plan_sweep`) and the
report loop over the sections a sweep config has, in this order, looking each up here. A new
kind of point is one new module plus its entry below (and its section in
``configs/sweeps/default.py``).
"""

from kure_jax.evaluation._types import Family
from kure_jax.evaluation.families import (
    formats,
    fp,
    nested,
    qat,
    runtimes,
    step_ratio,
    weight,
    weight_act,
)

__all__ = ["FAMILIES"]

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (fp.FAMILY, weight.FAMILY, weight_act.FAMILY, step_ratio.FAMILY, qat.FAMILY,
                   nested.FAMILY, formats.FAMILY, runtimes.FAMILY)
}
