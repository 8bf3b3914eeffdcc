"""The pure training and evaluation steps.

.. math::

   L = \\mathrm{CE}(\\mathrm{softmax}(f(x)), \\tilde y) + \\lambda \\, L_{KURE}(W),
   \\qquad \\tilde y = (1 - \\epsilon)\\, y + \\epsilon / C

where :math:`L_{KURE}` is :func:`kure_jax.penalty` over the selected kernels, its per-tensor
kurtosis computed by :func:`kure_jax.kernels.kurtosis_many` (jnp or the fused Pallas kernel, see
``StepConfig.penalty_impl``) and logged from the same vector. The same
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

from kure_jax import REDUCTIONS, UNIFORM_KURTOSIS, QATConfig, kernels, quantized_apply, select
from kure_jax.kurtosis import reduce_penalty_terms
from kure_jax.selection import LeafPredicate
from kure_jax.training._deprecations import deprecated_getattr
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
        fused kernel of :func:`kure_jax.kernels.kurtosis_many`; interpreted, hence slow, on
        CPU) or ``"auto"`` (the
        kernel on the backends in ``kure_jax.kernels.AUTO_PALLAS_BACKENDS``, else jnp). Unlike
        ``kernels.penalty(impl=None)`` it never reads the ``KURE_JAX_KERNELS`` variable.
      label_smoothing: ``epsilon`` in the formula above, in ``[0, 1)``.
      qat: a :class:`kure_jax.QATConfig` to train with fake-quantised weights and
        activations, or ``None``.
      axis_name: the ``pmap`` axis to average over, or ``None`` under ``jit``.

    Raises:
      ValueError: for ``kure_lambda < 0``, ``label_smoothing`` outside ``[0, 1)``, an unknown
        ``kure_reduction`` or ``penalty_impl``.
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

    def __post_init__(self) -> None:
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
    """float32 ``(n,)``: the kurtosis of each selected tensor, by ``spec.penalty_impl``.

    With the penalty on, the one computation serves the loss and the logged metrics
    (computing the metrics separately would read every weight once more per step).
    """
    leaves = [leaf for _, leaf in select(params, spec.kure_where)]
    return kernels.kurtosis_many(leaves, impl=spec.penalty_impl)


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
    """

    def loss_fn(trainable: dict[str, PyTree], state: TrainState, batch: Batch, rng: jax.Array):
        variables = {**trainable, "batch_stats": state.batch_stats}
        if not trainable["quant"]:
            del variables["quant"]
        logits, updates = _apply(
            model, variables, batch["image"], qat=spec.qat, train=True, rng=rng
        )
        ce = jnp.mean(
            cross_entropy(
                logits,
                batch["label"],
                num_classes=spec.num_classes,
                label_smoothing=spec.label_smoothing,
            )
        )
        loss = ce
        kure = jnp.zeros((), jnp.float32)
        kurt = None  # lambda = 0: the penalty is not even traced
        if spec.kure_lambda:
            kurt = _selected_kurtosis(trainable["params"], spec)
            kure = reduce_penalty_terms((kurt - spec.kure_target) ** 2, spec.kure_reduction)
            loss = ce + spec.kure_lambda * kure
        correct = jnp.argmax(logits, axis=-1) == batch["label"]
        aux = {"ce": ce, "kure": kure, "accuracy": jnp.mean(correct.astype(jnp.float32))}
        return loss, (aux, kurt, updates.get("batch_stats", {}))

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
      ``count``; under ``pmap`` summed over devices.
    """

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


__getattr__ = deprecated_getattr(__name__, {
    "make_eval_step": (
        "kure_jax.training.step.make_eval_step is deprecated: use make_state_eval_step (the "
        "name kure_jax.evaluation.make_eval_step stays for the evaluation engine's step).",
        make_state_eval_step,
    ),
})
