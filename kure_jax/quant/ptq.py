"""Post-training quantization of a whole params pytree under one ``QuantPolicy``."""

from __future__ import annotations

from typing import Any

import jax
from jax.typing import ArrayLike

from kure_jax import selection
from kure_jax.quant import formats
from kure_jax.quant.policy import QuantPolicy, check_policy, kept_axes, quantize

PyTree = Any

_DEFAULT_POLICY = QuantPolicy()


def quantize_params(
    params: PyTree,
    policy: QuantPolicy | formats.Format | str = _DEFAULT_POLICY,
    *,
    where: selection.LeafPredicate | None = None,
    key: jax.Array | None = None,
    step_ratio: ArrayLike | None = None,
) -> PyTree:
    """Fake-quantises the selected leaves of ``params``; the other leaves are returned as is.

    Each selected leaf gets its own step (``compute_step``), so a ``step_ratio`` sweep perturbs
    every layer's step by the same factor, as in the paper's robustness experiments.

    Works under ``jax.jit`` (pass ``policy`` and ``where`` as static arguments or close over them:
    a ``QuantPolicy`` is hashable) and ``jax.vmap`` over ``step_ratio`` or ``key``.

    Args:
      params: any pytree of arrays, e.g. a Flax ``{"params": ...}`` dict.
      policy: the quantizer applied to every selected leaf (default: 4-bit per-tensor symmetric
        max-abs, nearest rounding), or a data type: a
        :class:`~kure_jax.quant.formats.Format` or a preset name (``"mxfp4"``, ``"nvfp4"``,
        ``"nf4"``, ... :data:`~kure_jax.quant.formats.PRESETS`), whose blocks run along each
        kernel's input axis (-2: Dense ``(in, out)`` and HWIO conv kernels).
      where: leaf selection, as ``selection.selection_mask``: ``None`` selects conv/dense kernels
        (rank >= 2 leaves named ``kernel``, or every rank >= 2 leaf if no ``kernel`` exists);
        otherwise a predicate ``where(path: tuple[str, ...], leaf) -> bool``.
      key: PRNG key, required for ``policy.rounding == "stochastic"``. Leaf ``i`` (its index in
        ``jax.tree_util`` flatten order of the whole tree) uses ``jax.random.fold_in(key, i)``,
        so leaves draw independent noise and a leaf's noise does not depend on the selection.
      step_ratio: optional scalar multiplying every selected leaf's step (see ``compute_step``).

    Returns:
      A pytree with ``params``' structure; unselected leaves are the same objects as in
      ``params``, selected ones have their original shapes and dtypes.

    Raises:
      ValueError: if the selection matches nothing, stochastic rounding has no ``key``, a
        selected leaf is not floating or has no axis ``policy.axis`` (or no block axis of a
        format; the message names the leaf), or a format comes with a ``step_ratio``.
    """
    if isinstance(policy, formats.Format | str):
        return _quantize_params_format(params, formats.get_format(policy), where, step_ratio)
    check_policy(policy)
    if policy.rounding == "stochastic" and key is None:
        raise ValueError(
            "QuantPolicy(rounding='stochastic') needs key=jax.random.key(...) in quantize_params."
        )
    mask = selection.selection_mask(params, where)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    flags = treedef.flatten_up_to(mask)
    out = []
    for index, ((path, leaf), selected) in enumerate(zip(leaves_with_paths, flags, strict=True)):
        if not selected:
            out.append(leaf)
            continue
        _check_leaf(jax.tree_util.keystr(path, simple=True, separator="/"), leaf, policy)
        leaf_key = None if key is None else jax.random.fold_in(key, index)
        out.append(quantize(leaf, policy, key=leaf_key, step_ratio=step_ratio))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_leaf(name: str, leaf: Any, policy: QuantPolicy) -> None:
    """Shape/dtype checks with the leaf's path in the message (static, so fine under jit)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise ValueError(f"Selected leaf {name!r} must be a floating array; got dtype {dtype}.")
    ndim = len(leaf.shape)
    if policy.axis is not None and any(not -ndim <= a < ndim for a in policy.axis):
        raise ValueError(
            f"QuantPolicy.axis={policy.axis} does not exist in selected leaf {name!r} of shape "
            f"{tuple(leaf.shape)}; choose axes in -{ndim}..{ndim - 1}, axis=None, or narrow the "
            "selection with where=."
        )
    try:
        kept_axes(policy.axis, ndim)
    except ValueError as err:
        raise ValueError(f"Selected leaf {name!r} of shape {tuple(leaf.shape)}: {err}") from None
    if 0 in leaf.shape:
        raise ValueError(f"Selected leaf {name!r} is empty (shape {tuple(leaf.shape)}).")


def _quantize_params_format(
    params: PyTree, fmt: formats.Format, where: selection.LeafPredicate | None,
    step_ratio: ArrayLike | None,
) -> PyTree:
    """:func:`quantize_params` for a data type: each selected leaf through ``fake_quant_format``."""
    if step_ratio is not None:
        raise ValueError(f"step_ratio perturbs a QuantPolicy's step; format {fmt.name!r} "
                         "computes its scales by its own rule.")
    mask = selection.selection_mask(params, where)

    def quantize_leaf(path, leaf, selected):
        if not selected:
            return leaf
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise ValueError(f"Selected leaf {name!r} must be a floating array; got dtype {dtype}.")
        try:
            return formats.fake_quant_format(leaf, fmt)
        except ValueError as err:
            shape = tuple(leaf.shape)
            raise ValueError(f"Selected leaf {name!r} of shape {shape}: {err}") from None

    return jax.tree_util.tree_map_with_path(quantize_leaf, params, mask)
