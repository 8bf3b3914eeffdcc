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

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

PyTree = Any
Path = tuple[str, ...]
LeafPredicate = Callable[[Path, Any], bool]

__all__ = [
    "PAPER_LAYERS",
    "RULE_NAMES",
    "LayerRule",
    "LeafPredicate",
    "Path",
    "Selection",
    "as_rule",
    "default_selection",
    "edge_layers",
    "layer_order",
    "layer_path",
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


def path_to_str(path: Sequence[Any]) -> str:
    """Joins a key path with ``/``: ``("params", "Conv_0", "kernel") -> "params/Conv_0/kernel"``.

    Args:
      path: string keys, or a JAX key path as ``jax.tree_util.tree_flatten_with_path`` gives
        it (``DictKey``, ``SequenceKey``, ``GetAttrKey``, ...; an NNX variable's trailing
        ``.value`` is dropped, as in every selection).

    Returns:
      The keys joined with ``/``.

    >>> import jax
    >>> [(path, _)] = jax.tree_util.tree_flatten_with_path({"conv": [{"kernel": 1}]})[0]
    >>> path_to_str(path)
    'conv/0/kernel'
    """
    return "/".join(_path_names(tuple(path)))


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


def _describe_search(named: list[tuple[Path, Any]], where: Selection) -> str:
    rule = "the default rule (rank>=2 leaves named 'kernel', else rank>=2)" if where is None else (
        f"predicate {getattr(where, '__name__', repr(where))}"
    )
    shown = ", ".join(
        f"{path_to_str(p) or '<root>'}{tuple(getattr(leaf, 'shape', ()))}" for p, leaf in named[:12]
    )
    more = f" and {len(named) - 12} more" if len(named) > 12 else ""
    return f"{rule} over {len(named)} leaves: [{shown}{more}]"


def selection_mask(params: PyTree, where: Selection = None) -> PyTree:
    """A pytree of Python bools, same structure as ``params``, True on selected leaves.

    Args:
      params: any pytree of arrays (Flax variable dicts with or without a top-level
        ``"params"`` key, nested dicts, lists, ...).
      where: ``None`` for :func:`default_selection`, a :class:`LayerRule`, or a predicate
        on ``(path: tuple[str, ...], leaf)``.

    Returns:
      A pytree with ``params``' structure whose leaves are ``True``/``False``.

    Raises:
      ValueError: if no leaf is selected (the message names the rule and the
        leaves that were searched), so a typo never becomes a silent zero penalty.
    """
    named, treedef = _flatten(params)
    if isinstance(where, LayerRule):
        predicate = where.where(params)
    else:
        predicate = default_selection(params) if where is None else where
    flags = [bool(predicate(path, leaf)) for path, leaf in named]
    if not any(flags):
        raise ValueError(f"Selection matched no leaf: searched {_describe_search(named, where)}.")
    return jax.tree_util.tree_unflatten(treedef, flags)


def select(params: PyTree, where: Selection = None) -> list[tuple[str, Any]]:
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
    order, so this walks the mappings directly (Linen dicts and NNX states alike).
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


def layer_path(path: Sequence[Any]) -> str:
    """The layer of a kernel's path: ``("params", "b1", "conv1", "kernel") -> "b1/conv1"``.

    ``path`` holds string keys or JAX key entries, as :func:`path_to_str`.
    """
    return "/".join(_strip_params(_path_names(tuple(path)))[:-1])


def edge_layers(layers: Sequence[tuple[str, bool]], *, first: bool, last_dense: bool) -> set[str]:
    """The layers that ``skip_first`` / ``skip_last_dense`` leave out.

    Args:
      layers: ``(layer path, is_dense)`` of every layer with a kernel, in layer (call) order.
      first: leave out the first layer.
      last_dense: leave out the last dense layer (none if there is none).

    Returns:
      The paths left out (empty if ``layers`` is).
    """
    edges = set()
    if first and layers:
        edges.add(layers[0][0])
    dense = [name for name, is_dense in layers if is_dense]
    if last_dense and dense:
        edges.add(dense[-1])
    return edges


def layer_order(forward: Callable[[PyTree], Any], params: PyTree) -> list[str]:
    """The layers of ``params``' kernels in call order: the one layer-order mechanism.

    The order is that of each kernel's first use in the jaxpr of ``forward(params)``: tracing
    runs the Python code top to bottom, so a layer called earlier reads its kernel earlier.
    This one mechanism serves every caller (a :class:`LayerRule`'s "first"/"last" layer for
    the penalty, PTQ, QAT and the sweep) because it needs no framework hook (Linen, NNX and
    plain JAX models alike), traces shapes only (no FLOPs, no memory) and works on params whose
    dicts lost the call order (``jax.jit(model.init)``, restored checkpoints, NNX states, which
    are sorted by name).

    Args:
      forward: ``forward(params) -> anything``, e.g. ``lambda v: model.apply(v, images)``;
        traced once with abstract ``params`` (other inputs are closed over).
      params: a pytree holding the kernels (rank >= 2 leaves named ``kernel``), e.g. Linen
        variables, their ``"params"``, or an NNX state; arrays or ``jax.ShapeDtypeStruct``.

    Returns:
      Layer paths as :func:`layer_path` names them (``"stage1_block1/conv1"``), each once;
      kernels that ``forward`` never reads come last, in flatten order.

    >>> import flax.linen as nn
    >>> import jax.numpy as jnp
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(3, name="a_second")(nn.Dense(4, name="z_first")(x))
    >>> x = jnp.ones((1, 2))
    >>> params = jax.jit(Net().init)(jax.random.key(0), x)  # key-sorted: a_second first
    >>> layer_order(lambda v: Net().apply(v, x), params)
    ['z_first', 'a_second']
    """
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                            params)
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    closed = jax.make_jaxpr(forward)(abstract)
    kernels = {var: layer_path(path) for var, (path, leaf) in
               zip(closed.jaxpr.invars, leaves, strict=True)
               if _path_names(path)[-1:] == ("kernel",) and _ndim(leaf) >= 2}
    order: list[str] = []
    for eqn in closed.jaxpr.eqns:
        for var in eqn.invars:
            if not isinstance(var, jax_core.Literal) and var in kernels:
                order.append(kernels.pop(var))
    return list(dict.fromkeys([*order, *kernels.values()]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerRule:
    """Which layers' kernels a penalty, a quantizer or QAT acts on (frozen, hashable, validated).

    A rule selects the rank >= 2 leaves named ``kernel`` (conv/dense weights) of the layers
    whose path (``"stage1_block1/conv1"``: the module path of a Linen layer, the attribute path
    of an NNX one) matches ``include`` and not ``exclude`` (``re.fullmatch``), less the first
    layer and the last dense layer when asked. "First" and "last" follow the call order, read by
    :func:`layer_order` from the model's ``forward`` when it is given (the one order
    mechanism of the library), else the insertion order of ``params``' dicts (which is the call
    order for an eager Linen ``init`` only). A rule is not callable, so
    ``optax.inject_hyperparams`` keeps it static; use it anywhere a ``where=`` predicate goes,
    or resolve it into one with :meth:`where`. Config files name rules as strings, read by
    :func:`as_rule` (``"paper"``, ``"kernels"``).

    A rule part that matches nothing is reported by name, as qwix's ``get_unused_rules``
    does: an ``exclude`` that matches no layer warns (``UserWarning``, naming the pattern and
    the layers), and a rule that leaves no layer (e.g. an ``include`` that matches none) raises
    ValueError naming it.

    Attributes:
      include: regex of the layers to select (default: all).
      exclude: regex of layers to leave out, or ``None``.
      skip_first: leave out the first layer (the stem conv of a CNN).
      skip_last_dense: leave out the last dense layer (the classifier).

    >>> import numpy as np
    >>> params = {"conv0": {"kernel": np.ones((3, 3, 1, 4))},
    ...           "conv1": {"kernel": np.ones((3, 3, 4, 4))},
    ...           "head": {"kernel": np.ones((4, 10)), "bias": np.ones(10)}}
    >>> [name for name, _ in select(params, LayerRule(skip_first=True))]
    ['conv1/kernel', 'head/kernel']
    >>> [name for name, _ in select(params, LayerRule(exclude="head"))]
    ['conv0/kernel', 'conv1/kernel']
    """

    include: str = ".*"
    exclude: str | None = None
    skip_first: bool = False
    skip_last_dense: bool = False

    def __post_init__(self) -> None:
        for field in ("include", "exclude"):
            pattern = getattr(self, field)
            if pattern is None and field == "exclude":
                continue
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"LayerRule.{field} must be a regex; got {pattern!r} ({error})."
                                 ) from None
        for field in ("skip_first", "skip_last_dense"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LayerRule.{field} must be True or False; "
                                 f"got {getattr(self, field)!r}.")

    def layers(self, params: PyTree, *, forward: Callable[[PyTree], Any] | None = None,
               order: Sequence[str] | None = None) -> list[str]:
        """The selected layer paths of ``params``, in layer order.

        Args:
          params: a params pytree (Linen dict, with or without ``"params"``, or NNX state).
          forward: ``forward(params)``, the model's forward pass: the call order is read from
            it by :func:`layer_order`. ``None``: ``order``, else the dicts' insertion order.
          order: layer paths in call order, as :func:`layer_order` returns them (for a caller
            that already has it). Layers missing from it come after the listed ones.

        Raises:
          ValueError: if no layer is left (the message names the rule, the layers and the
            parts of the rule that match none).

        Warns:
          UserWarning: if ``exclude`` matches no layer (a typo would otherwise exclude nothing).
        """
        kernels = [(layer_path(p), _ndim(leaf) == 2) for p, leaf in
                   _kernels_in_insertion_order(params)]
        if forward is not None:
            order = layer_order(forward, params)
        if order is not None:
            rank = {name: i for i, name in enumerate(order)}
            kernels.sort(key=lambda item: rank.get(item[0], len(rank)))
        names = [name for name, _ in kernels]
        edges = edge_layers(kernels, first=self.skip_first, last_dense=self.skip_last_dense)
        chosen = [name for name in names if name not in edges and self._matches(name)]
        unused = "".join(f"; {part} matches no layer" for part in self.unused(names))
        if not chosen:
            raise ValueError(f"{self} selects no layer of {names}{unused}.")
        if unused:
            warnings.warn(f"{self}{unused} of {names}.", stacklevel=2)
        return chosen

    def _matches(self, name: str) -> bool:
        return bool(re.fullmatch(self.include, name)) and not (
            self.exclude is not None and re.fullmatch(self.exclude, name))

    def unused(self, layers: Sequence[str]) -> list[str]:
        """The parts of this rule that match none of ``layers`` (qwix's ``get_unused_rules``).

        Args:
          layers: layer paths, e.g. ``["stem", "block1/conv1", "head"]``.

        Returns:
          ``"include='...'"`` / ``"exclude='...'"`` for each regex that matches no layer (the
          default ``include='.*'`` is reported only for an empty model); empty if all match.

        >>> LayerRule(exclude="hed").unused(["stem", "head"])
        ["exclude='hed'"]
        """
        unused = []
        for field in ("include", "exclude"):
            pattern = getattr(self, field)
            if pattern is not None and not any(re.fullmatch(pattern, n) for n in layers):
                unused.append(f"{field}={pattern!r}")
        return unused

    def where(self, params: PyTree, *, forward: Callable[[PyTree], Any] | None = None,
              order: Sequence[str] | None = None) -> LeafPredicate:
        """This rule resolved on ``params`` as a predicate ``where(path, leaf)``: the resolver.

        The predicate accepts trees with or without the top-level ``"params"`` key, so it
        resolves once (e.g. on abstract variables) and applies to any params of the model.

        Args:
          params: as :meth:`layers`.
          forward: as :meth:`layers`.
          order: as :meth:`layers`.

        Raises:
          ValueError: as :meth:`layers`.
        """
        chosen = frozenset(self.layers(params, forward=forward, order=order))

        def where(path: Path, leaf: Any) -> bool:
            return (bool(path) and path[-1] == "kernel" and _ndim(leaf) >= 2
                    and layer_path(path) in chosen)

        where.__name__ = f"{self!r}"
        return where


#: The paper's layers: every conv/dense kernel but the first layer and the classifier.
PAPER_LAYERS = LayerRule(skip_first=True, skip_last_dense=True)


#: The rule names a config may give instead of a :class:`LayerRule` (see :func:`as_rule`).
RULE_NAMES: tuple[str, ...] = ("paper", "kernels")


def as_rule(value: str | LayerRule | None) -> LayerRule:
    """A config's layer selection as a :class:`LayerRule`: the one place rule names are read.

    Args:
      value: ``"paper"`` (:data:`PAPER_LAYERS`: every conv/dense kernel but the first layer and
        the last dense layer), ``"kernels"`` or ``None`` (``LayerRule()``: every conv/dense
        kernel), or a :class:`LayerRule`, returned unchanged.

    Returns:
      The rule.

    Raises:
      ValueError: for anything else; the message lists the accepted names.

    >>> as_rule("paper") == PAPER_LAYERS
    True
    >>> as_rule("kernels")
    LayerRule(include='.*', exclude=None, skip_first=False, skip_last_dense=False)
    """
    if isinstance(value, LayerRule):
        return value
    if value is None or value == "kernels":
        return LayerRule()
    if value == "paper":
        return PAPER_LAYERS
    raise ValueError(f"A layer selection must be one of {list(RULE_NAMES)} or a LayerRule; "
                     f"got {value!r}.")


#: What every ``where=`` of the library takes: ``None`` (the default rule), a rule, a predicate.
Selection = LeafPredicate | LayerRule | None
