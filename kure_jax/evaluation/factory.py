"""A user's own model for ``eval.py --model MODULE:FACTORY --params PATH``: the factory
protocol, params files and the checks that turn a bad input into one error line.

The factory protocol
--------------------
``MODULE:FACTORY`` names a zero-argument callable, ``MODULE`` a dotted module path (imported
with the current directory first on ``sys.path``, as ``python -m`` does) or a ``.py`` file.
``FACTORY()`` returns one of:

* a **Flax Linen module**: applied as ``module.apply(variables, images, train=False)`` if its
  ``__call__`` takes ``train``, else ``module.apply(variables, images)``. The params file
  holds its variables ``{"params": ..., "batch_stats": ...}`` as ``module.init`` returns them
  (a model with only ``"params"`` may store just the inner params dict). W/A PTQ works.
* a **Flax NNX module**: put in eval mode (``module.eval()``), split into its ``nnx.Param``
  and ``nnx.BatchStat`` state (the params file: that state as a pure dict,
  ``nnx.to_pure_dict``) and applied as ``module(images)``. W/A points are skipped.
* an **(apply_fn, params_template) pair**: ``apply_fn(params, images) -> logits``, and a
  pytree of arrays (or ``jax.ShapeDtypeStruct``) with the structure, shapes and dtypes of
  the params file. W/A points are skipped.

Images are float32 ``(B, H, W, C)`` of the dataset; the logits must be
``(B, dataset.num_classes)``.

Params files
------------
* an **Orbax** checkpoint directory of the params pytree, as written by
  ``orbax.checkpoint.StandardCheckpointer().save(path, params)`` (or a directory holding
  exactly one such item, as a ``CheckpointManager`` step directory does);
* a **.safetensors** file whose keys are the pytree's paths joined with ``"/"``
  (``"params/conv1/kernel"``): :func:`save_safetensors` writes one.

Leaves are matched to the model by path, so the file's own ordering does not matter; a
``params/`` level present in the file but not in the model (or the reverse) is tolerated;
values are cast to the model's dtypes.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kure_jax.evaluation.forward import ApplyFn, inference_kwargs

__all__ = [
    "ModelError",
    "UserModel",
    "check_params",
    "first_line",
    "load_params",
    "model_from_factory",
    "save_safetensors",
]

PyTree = Any


class ModelError(ValueError):
    """A user's model cannot be evaluated: its factory, its params file or its fit to the data.

    The message is one line naming the cause (module and import error, missing attribute,
    first mismatched leaf with both shapes, rejected image shape)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserModel:
    """What a factory returned, in one form.

    Attributes:
      kind: ``"linen"``, ``"nnx"`` or ``"apply_fn"``.
      apply_fn: ``(params, images) -> logits``.
      template: the params pytree with ``jax.ShapeDtypeStruct`` leaves.
      module: the Linen module (``kind == "linen"``), else ``None``.
    """

    kind: str
    apply_fn: ApplyFn
    template: PyTree
    module: nn.Module | None = None


def first_line(err: BaseException, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}".rstrip(": ")


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def model_from_factory(obj: Any, image_shape: Sequence[int]) -> UserModel:
    """Interprets what a factory returned (module docstring).

    Args:
      obj: a Linen module, an NNX module or an ``(apply_fn, params_template)`` pair.
      image_shape: one image's shape, to build a Linen module's variables (abstractly).

    Raises:
      ModelError: for another kind of object, or a Linen module whose ``init`` rejects
        images of ``(1, *image_shape)`` (naming the shape).
    """
    if isinstance(obj, nn.Module):
        kwargs = inference_kwargs(obj)
        images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        try:
            template = jax.eval_shape(lambda x: obj.init(jax.random.key(0), x, **kwargs), images)
        except Exception as err:  # any error of the user's model while tracing
            raise ModelError(f"the model rejects images of shape {images.shape} (image shape "
                             f"{tuple(image_shape)}): {first_line(err)}") from err
        template = dict(template)
        return UserModel(kind="linen", module=obj, template=template,
                         apply_fn=lambda v, x: obj.apply(v, x, **kwargs))
    if isinstance(obj, nnx.Module):
        obj.eval()  # BatchNorm running averages, no dropout
        graphdef, weights, rest = nnx.split(obj, (nnx.Param, nnx.BatchStat), ...)

        def apply(params: PyTree, images: jax.Array) -> jax.Array:
            state = jax.tree.map(lambda a: a, weights)  # a fresh State to fill in
            nnx.replace_by_pure_dict(state, params)
            return nnx.merge(graphdef, state, rest)(images)

        return UserModel(kind="nnx", apply_fn=apply, template=_abstract(nnx.to_pure_dict(weights)))
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
        apply_fn, template = obj
        try:
            template = _abstract(template)
        except Exception as err:
            raise ModelError(f"the params template is not a pytree of arrays "
                             f"({first_line(err)}).") from err
        return UserModel(kind="apply_fn", apply_fn=apply_fn, template=template)
    raise ModelError(f"the factory returned a {type(obj).__name__}; expected a Flax Linen "
                     "module, a Flax NNX module or an (apply_fn, params_template) pair.")


def _flat(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}``: the ``"/"``-joined paths of a pytree's leaves."""
    return {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def save_safetensors(params: PyTree, path: str | pathlib.Path) -> None:
    """Writes ``params`` (a pytree of arrays) to a ``.safetensors`` file that
    :func:`load_params` reads: one tensor per leaf, keyed by its ``"/"``-joined path.

    Raises:
      ImportError: if the ``safetensors`` package is not installed.
      ValueError: if two leaves have the same path string.
    """
    from safetensors.numpy import save_file

    flat = {key: np.ascontiguousarray(np.asarray(leaf)) for key, leaf in _flat(params).items()}
    if len(flat) != len(jax.tree_util.tree_leaves(params)):
        raise ValueError("two leaves of params have the same '/'-joined path.")
    save_file(flat, str(path))


def _read_flat(path: pathlib.Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelError(f"params {path}: no such file.")
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ModelError("reading .safetensors needs the 'safetensors' package "
                             "(pip install 'safetensors>=0.4').") from err
        try:
            return load_file(str(path))
        except Exception as err:  # a damaged or foreign file
            raise ModelError(f"params {path} cannot be read ({first_line(err)}).") from err
    if not path.exists():
        raise ModelError(f"params {path}: no such file or directory.")
    if not path.is_dir():
        raise ModelError(f"params {path}: expected an Orbax checkpoint directory or a "
                         ".safetensors file.")
    directory = path
    if not (path / "_METADATA").is_file():
        items = [p for p in path.iterdir() if (p / "_METADATA").is_file()]
        if len(items) != 1:
            raise ModelError(f"params {path}: not an Orbax checkpoint directory (no _METADATA "
                             "file, nor one item directory holding one).")
        directory = items[0]
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(directory.absolute())
    except Exception as err:  # Orbax/TensorStore errors of a damaged checkpoint
        raise ModelError(f"params {path} cannot be restored ({first_line(err)}).") from err
    return _flat(restored)


def check_params(have: dict[str, Any], template: PyTree, *, source: str) -> None:
    """Raises unless the flat leaves ``have`` (path -> array) are exactly the template's.

    Raises:
      ModelError: naming the first leaf (in the template's order) that is missing or has
        another shape, with both shapes, else the first extra leaf; and how many differ.
    """
    want = {k: tuple(v.shape) for k, v in _flat(template).items()}
    shapes = {k: tuple(np.shape(v)) for k, v in have.items()}
    missing = [k for k in want if k not in shapes]
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    extra = sorted(set(shapes) - set(want))
    problems = len(missing) + len(wrong) + len(extra)
    if not problems:
        return
    count = f" ({problems} mismatching leaves)" if problems > 1 else ""
    first = next((k for k in want if k in missing or k in wrong), None)
    if first in wrong:
        detail = (f"leaf {first!r} has shape {shapes[first]} in the params file, "
                  f"{want[first]} in the model")
    elif first is not None:
        detail = f"leaf {first!r} (shape {want[first]}) is missing from the params file"
    else:
        detail = (f"the params file has a leaf {extra[0]!r} (shape {shapes[extra[0]]}) that "
                  "the model does not have")
    raise ModelError(f"params {source} do not fit the model: {detail}{count}.")


def load_params(path: str | pathlib.Path, template: PyTree) -> PyTree:
    """Reads a params file (module docstring) into the structure of ``template``.

    Args:
      path: an Orbax checkpoint directory or a ``.safetensors`` file.
      template: the params pytree the model takes (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``template``'s structure with the file's values as NumPy arrays of its dtypes.

    Raises:
      ModelError: for a missing, unreadable or damaged file, or leaves that do not fit
        (:func:`check_params`).
    """
    path = pathlib.Path(path)
    have = _read_flat(path)
    flat_template = _flat(template)
    # The {"params": ...} level of Linen variables may be absent from the file (a model with
    # only params saved as state.params) or present for a template without it (a Linen
    # model's variables read into the NNX or plain-JAX form of the same network).
    if set(have) != set(flat_template):
        for candidate in ({f"params/{k}": v for k, v in have.items()},
                          {k.removeprefix("params/"): v for k, v in have.items()}):
            if set(candidate) == set(flat_template):
                have = candidate
                break
    check_params(have, template, source=str(path))
    leaves = [np.asarray(have[k]).astype(t.dtype, copy=False) for k, t in flat_template.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
