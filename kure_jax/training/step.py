"""The pure training and evaluation steps.

.. math::

   L = \\mathrm{CE}(\\mathrm{softmax}(f(x)), \\tilde y) + \\lambda \\, L_{KURE}(W),
   \\qquad \\tilde y = (1 - \\epsilon)\\, y + \\epsilon / C

where :math:`L_{KURE}` is :func:`kure_jax.penalty` over the selected kernels, computed with its
per-tensor kurtosis by :func:`kure_jax.kurtosis.penalty_and_kurtosis` (jnp or the fused Pallas
kernel, see ``StepConfig.penalty_impl``) and logged from the same vector. The same
functions run under ``jax.jit`` over a device mesh (``axis_name=None``: XLA reduces over
the global, sharded batch) and under ``jax.pmap`` (``axis_name="batch"``: gradients,
metrics and BatchNorm statistics are averaged across devices explicitly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kure_jax import QATConfig, kernels, quantized_apply, select
from kure_jax.kurtosis import REDUCTIONS, UNIFORM_KURTOSIS, kurtosis_many, penalty_and_kurtosis
from kure_jax.selection import LeafPredicate
from kure_jax.training import multibit as _multibit
from kure_jax.training.state import TrainState

__all__ = ["StepConfig", "cross_entropy", "make_state_eval_step", "make_train_step"]

PyTree = Any
Batch = dict[str, jax.Array]
StepMetrics = dict[str, jax.Array]  # scalar metrics (train) or sums (eval) of one step


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    """Static settings of the training and evaluation steps.

    Attributes:
      num_classes: number of logits.
      kure_lambda: weight of the KURE penalty; 0 skips computing it.
      kure_target: kurtosis target ``K_T``.
      kure_where: leaf selection of the penalty and of the logged kurtosis (``None``:
        all conv/dense kernels; see :mod:`kure_jax.selection`).
      kure_reduction: ``"mean"`` (paper), ``"sum"`` or ``"max"``.
      penalty_impl: how the kurtosis of the penalty and of the logged metrics is computed, one
        of ``kure_jax.kernels.IMPLS``: ``"jnp"`` (:func:`kure_jax.kurtosis`), ``"pallas"`` (the
        fused kernel of :func:`kure_jax.kernels.kurtosis_pallas`; interpreted, hence slow, on
        CPU) or ``"auto"`` (the
        kernel on the backends in ``kure_jax.kernels.AUTO_PALLAS_BACKENDS``, else jnp): the
        ``impl`` of :func:`kure_jax.kurtosis.penalty_and_kurtosis`. Unlike ``impl=None`` it never
        reads the ``KURE_JAX_KERNELS`` variable.
      label_smoothing: ``epsilon`` in the formula above, in ``[0, 1)``.
      qat: a :class:`kure_jax.QATConfig` to train with fake-quantised weights and
        activations, or ``None``. With ``qat_bits``, the template of every width.
      axis_name: the ``pmap`` axis to average over, or ``None`` under ``jit``.
      qat_bits: multi-bit QAT (:mod:`kure_jax.training.multibit`): the widths, e.g.
        ``(8, 4, 2)``, each ``qat`` with its ``weight_bits``/``act_bits`` that are not ``None``
        replaced by the width; ``None`` (default) trains the single width of ``qat``.
      multibit: with ``qat_bits``, ``"sum"``: one forward per width and one gradient of the
        *sum* (not mean, as Any-Precision DNNs) of their cross-entropies, plus the KURE term
        once (it is on the float weights, shared by all widths); ``"sample"``: one width per
        step, uniform, drawn by :func:`kure_jax.training.multibit.sample_width_index` and run
        by ``lax.switch`` (one compiled step).
      bn_per_bits: with ``qat_bits``, switchable BatchNorm: the state's ``batch_stats`` is
        ``{"w8": stats, ...}``, each width's training forward updates only its own entry and
        evaluation at a width uses its own. ``False``: one shared set; a ``"sum"`` step sets it
        to the mean of the widths' updates (one momentum step with their mean batch moments).

    Raises:
      ValueError: for ``kure_lambda < 0``, ``label_smoothing`` outside ``[0, 1)``, an unknown
        ``kure_reduction``, ``penalty_impl`` or ``multibit``; ``qat_bits`` without ``qat`` or
        as :func:`kure_jax.training.multibit.width_qats` refuses them (e.g. learned
        quantizers); ``bn_per_bits`` without ``qat_bits``.
    """

    num_classes: int
    kure_lambda: float = 0.0
    kure_target: float = UNIFORM_KURTOSIS
    kure_where: LeafPredicate | None = None
    kure_reduction: str = "mean"
    penalty_impl: str = "auto"
    label_smoothing: float = 0.0
    qat: QATConfig | None = None
    axis_name: str | None = None
    qat_bits: tuple[int, ...] | None = None
    multibit: str = "sum"
    bn_per_bits: bool = False

    def __post_init__(self) -> None:
        self._check_multibit()
        if self.kure_lambda < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                "kure_lambda must be >= 0 and label_smoothing in [0, 1); got "
                f"{self.kure_lambda} and {self.label_smoothing}."
            )
        if self.kure_reduction not in REDUCTIONS:
            raise ValueError(
                f"kure_reduction must be one of {REDUCTIONS}; got {self.kure_reduction!r}."
            )
        if not isinstance(self.penalty_impl, str) or self.penalty_impl not in kernels.IMPLS:
            raise ValueError(
                f"penalty_impl must be one of {kernels.IMPLS}; got {self.penalty_impl!r}."
            )


    def _check_multibit(self) -> None:
        _multibit.check_options(self.multibit, self.bn_per_bits, self.qat_bits is not None)
        if self.qat_bits is None:
            return
        if self.qat is None:
            raise ValueError(f"qat_bits={self.qat_bits!r} needs qat, the QATConfig template "
                             "of every width.")
        widths = _multibit.width_qats(self.qat, self.qat_bits)
        object.__setattr__(self, "qat_bits", tuple(b for b, _ in widths))  # lists from JSON

    @property
    def width_qats(self) -> tuple[tuple[int, QATConfig], ...]:
        """``((bits, QATConfig), ...)`` of the widths of ``qat_bits`` (empty without it)."""
        if self.qat_bits is None:
            return ()
        return _multibit.width_qats(self.qat, self.qat_bits)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing.

    Args:
      logits: float ``(batch, num_classes)``.
      labels: int ``(batch,)`` in ``[0, num_classes)``.
      num_classes: number of classes.
      label_smoothing: mass spread uniformly over all classes.

    Returns:
      float32 ``(batch,)``.
    """
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _apply(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    *,
    qat: QATConfig | None,
    train: bool,
    rng: jax.Array | None,
) -> Any:
    kwargs: dict[str, Any] = {"train": train}
    if train:
        kwargs.update(mutable=["batch_stats"], rngs={"dropout": rng})
    if qat is None:
        return model.apply(variables, images, **kwargs)
    return quantized_apply(model, variables, images, qat=qat, **kwargs)


def _all_finite(*trees: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _selected_kurtosis(params: PyTree, spec: StepConfig) -> jax.Array:
    """float32 ``(n,)``: the kurtosis of each selected tensor, by ``spec.penalty_impl``, for the
    log of a step without the penalty (with it, ``penalty_and_kurtosis`` gives the vector)."""
    leaves = [leaf for _, leaf in select(params, spec.kure_where)]
    return kurtosis_many(leaves, impl=spec.penalty_impl)


def make_train_step(
    model: nn.Module, spec: StepConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, StepMetrics]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``, a pure function.

    Args:
      model: the Flax classifier; under ``pmap`` built with ``bn_axis_name=spec.axis_name``
        so BatchNorm statistics cover the global batch.
      spec: the static settings.

    Returns:
      ``train_step``: takes a :class:`TrainState` and a batch ``{"image": (b, H, W, C),
      "label": (b,) int}`` and returns the updated state and scalar metrics ``loss``,
      ``ce``, ``kure`` (0 when ``kure_lambda == 0``), ``accuracy``, ``kurtosis_mean`` and
      ``kurtosis_max`` (over the selected kernels, before the update), ``grad_norm`` and
      ``finite`` (loss, gradient norm and the new state are all finite). Wrap it in
      ``jax.jit`` or ``jax.pmap(..., axis_name=spec.axis_name)``.

      With ``spec.qat_bits`` and ``multibit="sum"``, ``ce`` is the sum over the widths (the
      term of ``loss``), ``accuracy`` their mean, and ``ce_w8``, ``accuracy_w8``, ... each
      width's; with ``"sample"``, ``ce``/``accuracy`` are the drawn width's and ``bits`` (float)
      is that width.
    """
    task = _single_width_task(model, spec) if spec.qat_bits is None else _multibit_task(
        model, spec)

    def loss_fn(trainable: dict[str, PyTree], state: TrainState, batch: Batch, rng: jax.Array):
        ce, task_aux, batch_stats = task(trainable, state, batch, rng)
        loss = ce
        kure = jnp.zeros((), jnp.float32)
        kurt = None  # lambda = 0: the penalty is not even traced
        if spec.kure_lambda:
            # One computation serves the loss and the logged metrics (computing the metrics
            # separately would read every weight once more per step).
            kure, kurt = penalty_and_kurtosis(
                trainable["params"], spec.kure_target, where=spec.kure_where,
                reduction=spec.kure_reduction, impl=spec.penalty_impl)
            loss = ce + spec.kure_lambda * kure
        aux = {"ce": ce, "kure": kure, **task_aux}
        return loss, (aux, kurt, batch_stats)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, StepMetrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        if spec.axis_name is not None:  # distinct dropout masks per device, as under jit
            rng = jax.random.fold_in(rng, jax.lax.axis_index(spec.axis_name))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (aux, kurt, batch_stats)), grads = grad_fn(state.trainable, state, batch, rng)
        metrics = {"loss": loss, **aux}
        if spec.axis_name is not None:
            # Equal per-device batches: the mean of per-device means is the global mean.
            grads, metrics, batch_stats = jax.lax.pmean(
                (grads, metrics, batch_stats), spec.axis_name
            )
        if kurt is None:  # no penalty: the logged kurtosis is computed here
            kurt = _selected_kurtosis(state.params, spec)
        new_state = state.apply_gradients(grads, batch_stats=batch_stats)
        grad_norm = optax.tree.norm(grads)
        metrics.update(
            kurtosis_mean=jnp.mean(kurt),
            kurtosis_max=jnp.max(kurt),
            grad_norm=grad_norm,
            # A NaN/Inf gradient makes the norm NaN/Inf: no second pass over the gradients.
            finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            & _all_finite(new_state.trainable, batch_stats),
        )
        return new_state, metrics

    return train_step


def make_state_eval_step(
    model: nn.Module, spec: StepConfig
) -> Callable[[TrainState, Batch], StepMetrics]:
    """Builds ``eval_step(state, batch) -> sums`` on a :class:`TrainState`, a pure function.

    The training loop's counterpart of :func:`make_train_step` (same batches, same
    ``spec.axis_name``). To evaluate variables outside a training run, e.g. quantised ones, use
    :func:`kure_jax.evaluation.make_eval_step` and :func:`kure_jax.evaluation.evaluate`.

    Args:
      model: the Flax classifier (BatchNorm uses its running averages).
      spec: the static settings (``qat`` evaluates the fake-quantised model).

    Returns:
      ``eval_step``: for a batch ``{"image", "label", "mask"}`` returns float32 sums over
      the unmasked rows: ``loss_sum`` (cross-entropy without smoothing), ``correct`` and
      ``count``; under ``pmap`` summed over devices. With ``spec.qat_bits`` also
      ``loss_sum_w8``, ``correct_w8``, ... per width (each with its own BatchNorm statistics
      under ``bn_per_bits``), and ``loss_sum``/``correct`` are their means over the widths, so
      the loop's ``accuracy`` (which picks the best checkpoint) is the mean accuracy.
    """
    if spec.qat_bits is not None:
        return _multibit_eval_step(model, spec)

    def eval_step(state: TrainState, batch: Batch) -> StepMetrics:
        logits = _apply(model, state.variables, batch["image"], qat=spec.qat, train=False, rng=None)
        mask = batch["mask"].astype(jnp.float32)
        ce = cross_entropy(logits, batch["label"], num_classes=spec.num_classes)
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        sums = {
            "loss_sum": jnp.sum(ce * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }
        if spec.axis_name is not None:
            sums = jax.lax.psum(sums, spec.axis_name)
        return sums

    return eval_step


# ---------------------------------------------------------------- the task loss, one or many widths

# ``task(trainable, state, batch, rng) -> (ce, aux, new batch_stats)``: the data term of the
# loss, its metrics besides ``ce``/``kure``, and the BatchNorm statistics after the forward(s).
_Task = Callable[[dict[str, PyTree], TrainState, Batch, jax.Array],
                 tuple[jax.Array, StepMetrics, PyTree]]


def _train_forward(model: nn.Module, trainable: dict[str, PyTree], batch_stats: PyTree,
                   images: jax.Array, qat: QATConfig | None, rng: jax.Array):
    """``(logits, new batch_stats)`` of one training-mode forward pass."""
    variables = {**trainable, "batch_stats": batch_stats}
    if not trainable["quant"]:
        del variables["quant"]
    logits, updates = _apply(model, variables, images, qat=qat, train=True, rng=rng)
    return logits, updates.get("batch_stats", {})


def _ce_and_accuracy(logits: jax.Array, labels: jax.Array, spec: StepConfig):
    """float32 scalars: mean (smoothed) cross-entropy and accuracy of a batch."""
    ce = jnp.mean(
        cross_entropy(
            logits,
            labels,
            num_classes=spec.num_classes,
            label_smoothing=spec.label_smoothing,
        )
    )
    correct = jnp.argmax(logits, axis=-1) == labels
    return ce, jnp.mean(correct.astype(jnp.float32))


def _single_width_task(model: nn.Module, spec: StepConfig) -> _Task:
    def task(trainable, state, batch, rng):
        logits, batch_stats = _train_forward(
            model, trainable, state.batch_stats, batch["image"], spec.qat, rng)
        ce, accuracy = _ce_and_accuracy(logits, batch["label"], spec)
        return ce, {"accuracy": accuracy}, batch_stats

    return task


def _multibit_task(model: nn.Module, spec: StepConfig) -> _Task:
    widths = spec.width_qats
    per_bits = spec.bn_per_bits

    def at_width(i, trainable, state, batch, rng):
        bits, qat = widths[i]
        stats = _multibit.batch_stats_at(state.batch_stats, bits, per_bits=per_bits)
        # Every width sees the same batch and dropout key: the "sum" gradient is exactly the
        # sum of the single-width gradients of this step.
        logits, new_stats = _train_forward(model, trainable, stats, batch["image"], qat, rng)
        ce, accuracy = _ce_and_accuracy(logits, batch["label"], spec)
        if per_bits:  # only this width's statistics change
            new_stats = {**state.batch_stats, _multibit.width_key(bits): new_stats}
        return ce, accuracy, new_stats

    def sum_task(trainable, state, batch, rng):
        results = [at_width(i, trainable, state, batch, rng) for i in range(len(widths))]
        aux = {"accuracy": jnp.mean(jnp.stack([acc for _, acc, _ in results]))}
        for (bits, _), (ce, acc, _) in zip(widths, results, strict=True):
            aux[f"ce_{_multibit.width_key(bits)}"] = ce
            aux[f"accuracy_{_multibit.width_key(bits)}"] = acc
        if per_bits:
            batch_stats = {key: stats[key] for key, (_, _, stats) in zip(
                (_multibit.width_key(b) for b, _ in widths), results, strict=True)}
        else:
            # BatchNorm's running averages are linear in the batch moments, so the mean of the
            # widths' updated averages is one momentum step with their mean moments.
            batch_stats = jax.tree.map(lambda *xs: sum(xs) / len(xs),
                                       *[stats for _, _, stats in results])
        ce = sum((ce for ce, _, _ in results[1:]), results[0][0])
        return ce, aux, batch_stats

    def sample_task(trainable, state, batch, rng):
        index = _multibit.sample_width_index(state.rng, state.step, len(widths))
        branches = [
            lambda trainable, i=i: at_width(i, trainable, state, batch, rng)
            for i in range(len(widths))
        ]
        ce, accuracy, batch_stats = jax.lax.switch(index, branches, trainable)
        bits = jnp.asarray([b for b, _ in widths], jnp.float32)[index]
        return ce, {"accuracy": accuracy, "bits": bits}, batch_stats

    return sum_task if spec.multibit == "sum" else sample_task


def _multibit_eval_step(
    model: nn.Module, spec: StepConfig
) -> Callable[[TrainState, Batch], StepMetrics]:
    """:func:`make_state_eval_step` for ``spec.qat_bits``: every width on every batch."""

    def eval_step(state: TrainState, batch: Batch) -> StepMetrics:
        mask = batch["mask"].astype(jnp.float32)
        sums = {"count": jnp.sum(mask)}
        for bits, qat in spec.width_qats:
            variables = {"params": state.params, "batch_stats": _multibit.batch_stats_at(
                state.batch_stats, bits, per_bits=spec.bn_per_bits)}
            if state.quant:
                variables["quant"] = state.quant
            logits = _apply(model, variables, batch["image"], qat=qat, train=False, rng=None)
            ce = cross_entropy(logits, batch["label"], num_classes=spec.num_classes)
            correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
            sums[f"loss_sum_{_multibit.width_key(bits)}"] = jnp.sum(ce * mask)
            sums[f"correct_{_multibit.width_key(bits)}"] = jnp.sum(correct * mask)
        keys = [_multibit.width_key(b) for b in spec.qat_bits]
        for name in ("loss_sum", "correct"):
            sums[name] = sum(sums[f"{name}_{k}"] for k in keys) / len(keys)
        if spec.axis_name is not None:
            sums = jax.lax.psum(sums, spec.axis_name)
        return sums

    return eval_step
