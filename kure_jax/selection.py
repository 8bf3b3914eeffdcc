"""Choosing which leaves of a params pytree a KURE penalty or a quantizer acts on.

A *selection* is either ``None`` (the default rule below) or a predicate
``where(path, leaf) -> bool`` where ``path`` is the tuple of string keys leading
to the leaf, e.g. ``("params", "Conv_0", "kernel")``. Flax NNX states
(``nnx.state(model, nnx.Param)``) give the same names as Linen dicts: the
``value`` attribute of each ``nnx.Variable`` is not part of the path
(``("conv", "kernel")``).

Default rule: every leaf of rank >= 2 stored under a key named ``kernel`` (the
weights of Flax ``Conv``/``Dense`` layers). A tree that has no ``kernel`` key at
all (a hand-written dict of arrays, a bare list of matrices) falls back to every
leaf of rank >= 2. Biases, BatchNorm scales and other vectors are never selected
by default.

Selections are resolved from shapes and names only, so they work on concrete
arrays, tracers and ``jax.ShapeDtypeStruct`` alike, inside or outside ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any
Path = tuple[str, ...]
LeafPredicate = Callable[[Path, Any], bool]

__all__ = [
    "LeafPredicate",
    "Path",
    "default_selection",
    "paper_selection",
    "path_to_str",
    "select",
    "selection_mask",
]


def _key_to_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_names(path: tuple[Any, ...]) -> Path:
    # A Flax NNX Variable (``nnx.Param``) flattens to its ``.value`` attribute, so the leaves of
    # ``nnx.state(model)`` end in ``GetAttrKey("value")``: dropped, so that NNX and Linen
    # trees give the same names (``conv/kernel``). A dict key named "value" is kept.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return tuple(_key_to_str(k) for k in path)


def _flatten(params: PyTree) -> tuple[list[tuple[Path, Any]], Any]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    named = [(_path_names(path), leaf) for path, leaf in leaves_with_path]
    return named, treedef


def path_to_str(path: Path) -> str:
    """Joins a key path with ``/``: ``("params", "Conv_0", "kernel") -> "params/Conv_0/kernel"``."""
    return "/".join(path)


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))


def default_selection(params: PyTree) -> LeafPredicate:
    """Returns the default predicate for ``params``: conv/dense kernels.

    Args:
      params: any pytree of arrays (only names and shapes are read).

    Returns:
      ``where(path, leaf)`` that is true for rank >= 2 leaves under a key named
      ``kernel``; if ``params`` contains no ``kernel`` key, for every rank >= 2 leaf.
    """
    named, _ = _flatten(params)
    has_kernel_names = any("kernel" in path for path, _ in named)
    if has_kernel_names:
        return lambda path, leaf: _ndim(leaf) >= 2 and bool(path) and path[-1] == "kernel"
    return lambda path, leaf: _ndim(leaf) >= 2


def _describe_search(named: list[tuple[Path, Any]], where: LeafPredicate | None) -> str:
    rule = "the default rule (rank>=2 leaves named 'kernel', else rank>=2)" if where is None else (
        f"predicate {getattr(where, '__name__', repr(where))}"
    )
    shown = ", ".join(
        f"{path_to_str(p) or '<root>'}{tuple(getattr(leaf, 'shape', ()))}" for p, leaf in named[:12]
    )
    more = f" and {len(named) - 12} more" if len(named) > 12 else ""
    return f"{rule} over {len(named)} leaves: [{shown}{more}]"


def selection_mask(params: PyTree, where: LeafPredicate | None = None) -> PyTree:
    """A pytree of Python bools, same structure as ``params``, True on selected leaves.

    Args:
      params: any pytree of arrays (Flax variable dicts with or without a top-level
        ``"params"`` key, nested dicts, lists, ...).
      where: ``None`` for :func:`default_selection`, or a predicate on
        ``(path: tuple[str, ...], leaf)``.

    Returns:
      A pytree with ``params``' structure whose leaves are ``True``/``False``.

    Raises:
      ValueError: if no leaf is selected (the message names the rule and the
        leaves that were searched), so a typo never becomes a silent zero penalty.
    """
    named, treedef = _flatten(params)
    predicate = default_selection(params) if where is None else where
    flags = [bool(predicate(path, leaf)) for path, leaf in named]
    if not any(flags):
        raise ValueError(f"Selection matched no leaf: searched {_describe_search(named, where)}.")
    return jax.tree_util.tree_unflatten(treedef, flags)


def select(params: PyTree, where: LeafPredicate | None = None) -> list[tuple[str, Any]]:
    """Selected leaves as ``(path string, leaf)`` pairs, in ``jax.tree_util`` flatten order.

    Args:
      params: any pytree of arrays.
      where: as in :func:`selection_mask`.

    Returns:
      A non-empty list of ``(path_to_str(path), leaf)``.

    Raises:
      ValueError: if nothing is selected.
    """
    named, _ = _flatten(params)
    flags = jax.tree_util.tree_leaves(selection_mask(params, where))
    pairs = zip(named, flags, strict=True)
    return [(path_to_str(path), leaf) for (path, leaf), flag in pairs if flag]


def _kernels_in_insertion_order(tree: Any, prefix: Path = ()) -> list[tuple[Path, Any]]:
    """Kernel leaves in the dicts' insertion order (Flax records modules in call order).

    ``jax.tree_util`` sorts dict keys ("Conv_10" < "Conv_2"), which loses the layer
    order, so this walks the mappings directly.
    """
    found: list[tuple[Path, Any]] = []
    if isinstance(tree, Mapping):
        for key, child in tree.items():
            path = (*prefix, str(key))
            if key == "kernel" and _ndim(child) >= 2:
                found.append((path, child))
            else:
                found.extend(_kernels_in_insertion_order(child, path))
    elif isinstance(tree, list | tuple):
        for index, child in enumerate(tree):
            found.extend(_kernels_in_insertion_order(child, (*prefix, str(index))))
    return found


def _strip_params(path: Path) -> Path:
    # Lets a predicate built from ``{"params": ...}`` apply to the inner dict and vice versa.
    return path[1:] if path[:1] == ("params",) else path


def paper_selection(
    params: PyTree, *, first_conv: str | None = None, last_dense: str | None = None
) -> LeafPredicate:
    """The paper's selection: every conv/dense kernel except the first conv and the final dense.

    KURE's reference regularises all conv kernels but the first conv, and not the
    classifier; those two layers also stay full precision in its quantized runs.

    The two excluded layers are found, in this order of preference:

    1. by name, if given (``first_conv="stem_conv"`` matches any path component);
    2. by the names of :mod:`kure_jax.models` (``"stem_conv"`` and ``"head"``) when present;
    3. by layer order: the first rank-4 ``kernel`` and the last rank-2 ``kernel`` in the
       dicts' insertion order, which is the call order for params from an eager
       ``model.init``. ``jax.jit(model.init)`` and ``jax.tree`` operations sort dict keys,
       so for such trees pass the names explicitly.

    Args:
      params: a Flax-style nested mapping of arrays with ``kernel`` leaves.
      first_conv: name of the first conv layer (a path component), or None to detect it.
      last_dense: name of the final dense layer, or None to detect it (a model without
        a rank-2 kernel excludes no dense layer).

    Returns:
      A predicate ``where(path, leaf)`` for :func:`penalty`, :func:`quantize_params`, ...
      It accepts trees with or without the top-level ``"params"`` key.

    Raises:
      ValueError: if ``params`` holds no rank-4 (conv) kernel, a given name matches no
        kernel, or no kernel remains after the exclusions.
    """
    kernels = _kernels_in_insertion_order(params)
    convs = [path for path, leaf in kernels if _ndim(leaf) == 4]
    denses = [path for path, leaf in kernels if _ndim(leaf) == 2]
    if not convs:
        raise ValueError(
            "paper_selection needs conv kernels (rank-4 leaves named 'kernel'); found kernels: "
            f"{[path_to_str(p) for p, _ in kernels] or 'none'}."
        )
    excluded = _named_or_ordered(convs, first_conv, _DEFAULT_FIRST_CONV, convs[0], "first_conv")
    if denses or last_dense is not None:
        fallback = denses[-1] if denses else None
        excluded |= _named_or_ordered(denses, last_dense, _DEFAULT_LAST_DENSE, fallback,
                                      "last_dense")
    chosen = {_strip_params(path) for path, _ in kernels} - {_strip_params(p) for p in excluded}
    if not chosen:
        raise ValueError(
            "paper_selection leaves nothing once the first conv and the last dense are excluded: "
            f"excluded {sorted(path_to_str(p) for p in excluded)}."
        )

    def where(path: Path, leaf: Any) -> bool:
        del leaf
        return _strip_params(tuple(path)) in chosen

    where.__name__ = "paper_selection"
    return where


# The layer names of kure_jax.models; other models fall back to layer order.
_DEFAULT_FIRST_CONV = "stem_conv"
_DEFAULT_LAST_DENSE = "head"


def _named_or_ordered(
    candidates: list[Path], name: str | None, default_name: str, fallback: Path | None, arg: str
) -> set[Path]:
    if name is not None:
        matched = {p for p in candidates if name in p}
        if not matched:
            raise ValueError(
                f"paper_selection({arg}={name!r}) matches no kernel; candidates: "
                f"{[path_to_str(p) for p in candidates]}."
            )
        return matched
    by_default_name = {p for p in candidates if default_name in p}
    if by_default_name:
        return by_default_name
    return set() if fallback is None else {fallback}
