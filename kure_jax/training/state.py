"""The train state: every array a training run needs to continue, in one pytree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.typing import ArrayLike

from kure_jax import QATConfig, init_quant_from_params
from kure_jax._arrays import leaf_shapes, shape_mismatch

__all__ = ["TrainState", "create_train_state", "state_from_tree", "state_to_tree"]

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Model variables, optimizer state, step and RNG of a run.

    Attributes:
      step: int32 scalar, number of optimizer steps taken.
      params: the ``"params"`` collection (float32 weights).
      batch_stats: the ``"batch_stats"`` collection (BatchNorm running statistics);
        ``{}`` for models without BatchNorm. With multi-bit QAT's per-width BatchNorm
        (``StepConfig.bn_per_bits``) one collection per width, ``{"w8": ..., "w4": ...}``
        (:mod:`kure_jax.training.multibit`); :attr:`variables` then does not fit
        ``model.apply``: pick a width with ``multibit.batch_stats_at``.
      quant: the QAT ``"quant"`` collection (learned quantizer steps); ``{}`` without QAT.
      opt_state: optimizer state of ``tx`` over :attr:`trainable`.
      rng: a new-style ``jax.random.key``; step ``s`` uses ``fold_in(rng, s)``, so the
        key never changes and resuming needs no RNG bookkeeping.
      tx: the optimizer (static, not an array).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    quant: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @property
    def trainable(self) -> dict[str, PyTree]:
        """What the optimizer updates: ``{"params": ..., "quant": ...}``."""
        return {"params": self.params, "quant": self.quant}

    @property
    def variables(self) -> dict[str, PyTree]:
        """Flax variables for ``model.apply``: params, batch_stats and (QAT) quant."""
        variables = {"params": self.params, "batch_stats": self.batch_stats}
        if self.quant:
            variables["quant"] = self.quant
        return variables

    def apply_gradients(self, grads: dict[str, PyTree], *, batch_stats: PyTree) -> TrainState:
        """One optimizer step on :attr:`trainable`; ``grads`` has the same structure."""
        trainable = self.trainable
        updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return self.replace(
            step=self.step + 1,
            params=trainable["params"],
            quant=trainable["quant"],
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


def create_train_state(
    model: nn.Module,
    *,
    rng: jax.Array,
    input_shape: Sequence[int],
    tx: optax.GradientTransformation,
    qat: QATConfig | None = None,
    sample_images: ArrayLike | None = None,
    pretrained: PyTree | None = None,
) -> TrainState:
    """Initialises a model and its optimizer (one jitted init program).

    Args:
      model: an unbound Flax classifier called as ``model(x, train=...)``.
      rng: a ``jax.random.key``; split into the init key and :attr:`TrainState.rng`.
      input_shape: ``(height, width, channels)`` of one image.
      tx: the optimizer, applied to ``{"params": ..., "quant": ...}``.
      qat: a :class:`kure_jax.QATConfig`, or ``None`` for a float model. Its learned
        quantizer steps/clips are initialised by :func:`kure_jax.init_quant_from_params`
        from ``sample_images`` (eagerly: their signedness must be concrete).
      sample_images: a representative float batch ``(n, *input_shape)``; required with a
        ``qat`` that has learned quantizers. Use the same batch on every process.
      pretrained: variables ``{"params", "batch_stats"[, ...]}`` of the same model to start
        from instead of the random init (e.g. QAT fine-tuning of a float model); other
        collections in it (an old ``"quant"``) are ignored.

    Returns:
      A :class:`TrainState` at step 0. Its dicts are key-sorted (``jit`` output), so
      read layer order with :func:`kure_jax.training.build.kure_selection`, not from here.

    Raises:
      ValueError: if ``qat`` needs ``sample_images`` and none are given, or
        ``pretrained`` does not match the model's variable names and shapes (the message
        names the first differing leaf path and both shapes).
    """
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    init = jax.jit(lambda key, x: model.init({"params": key}, x, train=False))
    variables = dict(init(init_rng, dummy))
    if pretrained is not None:
        for name in ("params", "batch_stats"):
            variables[name] = _matching(name, variables.get(name, {}), pretrained.get(name, {}))
    if qat is not None and qat.has_learned_state:
        if sample_images is None:
            raise ValueError(
                f"QAT config {qat.name} learns quantizer steps, initialised from data: pass "
                "sample_images (a representative training batch)."
            )
        variables["quant"] = init_quant_from_params(
            model, variables, jnp.asarray(sample_images), qat=qat, train=False
        )
    params = variables["params"]
    quant = variables.get("quant", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        quant=quant,
        opt_state=tx.init({"params": params, "quant": quant}),
        rng=state_rng,
        tx=tx,
    )


def _matching(name: str, fresh: PyTree, given: PyTree) -> PyTree:
    """``given`` as ``fresh``'s dtypes if it has ``fresh``'s leaf paths and shapes.

    Raises:
      ValueError: naming the first leaf path (sorted) that is missing, extra or of another
        shape, with both shapes, and how many leaves differ.
    """
    want, have = leaf_shapes(fresh), leaf_shapes(given)
    mismatch = shape_mismatch(want, have)
    if mismatch is not None:
        first, count = mismatch
        raise ValueError(
            f"pretrained {name!r} do not match the model: {name}/{first} is "
            f"{have.get(first, 'missing')} in the checkpoint, {want.get(first, 'absent')} in "
            f"the model ({count} differing leaves)."
        )
    # By path, not by tree structure: a FrozenDict or another dict type of the same leaves fits.
    leaves = {_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(given)}
    return jax.tree_util.tree_map_with_path(
        lambda path, f: jnp.asarray(leaves[_key(path)], f.dtype), fresh
    )


def _key(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_to_tree(state: TrainState) -> dict[str, PyTree]:
    """A plain pytree of the state for checkpointing: the RNG key as its raw ``uint32`` data."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "quant": state.quant,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }


def state_from_tree(template: TrainState, tree: dict[str, PyTree]) -> TrainState:
    """Inverse of :func:`state_to_tree`; ``template`` supplies ``tx`` and the structure."""
    return template.replace(
        step=tree["step"],
        params=tree["params"],
        batch_stats=tree["batch_stats"],
        quant=tree["quant"],
        opt_state=tree["opt_state"],
        rng=jax.random.wrap_key_data(tree["rng"]),
    )
