"""torchvision weights -> kure_jax variables, as a checkpoint that train.py and eval.py read.

    python -m kure_jax.models.convert --arch=resnet18 --weights=resnet18.pth --out=runs/tv_resnet18
    python train.py --config configs/imagenet_resnet18_kure.py --config.init_from=runs/tv_resnet18
    python eval.py --checkpoint runs/tv_resnet18

Nothing is downloaded: ``--weights`` is a torchvision state dict saved by the user, either a
``.pth``/``.pt`` file (read with ``torch.load``, so torch must be installed) or a
``.safetensors`` file (read with the ``safetensors`` package; no torch needed).

The kure_jax models follow torchvision's layout exactly (symmetric ``k // 2`` padding, BatchNorm
epsilon 1e-5 and momentum 0.1 (Flax 0.9), ResNet-50 v1.5 with the stride on the 3x3 conv,
MobileNet-V2's channel rounding), so the conversion is a renaming plus layout changes:

* conv weights ``(O, I/groups, kh, kw)`` (OIHW) -> kernels ``(kh, kw, I/groups, O)`` (HWIO);
  a depthwise ``(C, 1, 3, 3)`` becomes ``(3, 3, 1, C)``, Flax's ``feature_group_count=C`` layout;
* ``Linear.weight`` ``(out, in)`` -> ``Dense`` kernel ``(in, out)``;
* BatchNorm ``weight``/``bias`` -> ``params`` ``scale``/``bias``, ``running_mean``/``running_var``
  -> ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` is dropped.

Names (torchvision -> kure_jax, see :mod:`kure_jax.models.resnet` and
:mod:`kure_jax.models.mobilenet`)::

    conv1, bn1, fc                        -> stem_conv, stem_norm, head          (ResNets)
    layer{s}.{b}.conv{k} / bn{k}          -> stage{s}_block{b+1}/conv{k} / norm{k}
    layer{s}.{b}.downsample.0 / .1        -> stage{s}_block{b+1}/proj_conv / proj_norm
    features.0.0 / .1, classifier.1       -> stem_conv / stem_norm, head           (MobileNet-V2)
    features.{i}.conv.*                   -> block{i}/{expand,depthwise,project}_{conv,norm}
    features.18.0 / .1                    -> last_conv / last_norm

The checkpoint is ``OUT/checkpoints/0/{state,config,meta}``, the layout of
:mod:`kure_jax.training.checkpoint` (step 0, no optimizer state), with a config naming the
model, its options, the class count and the source file, so ``restore_for_eval``,
``config.init_from`` and ``eval.py --checkpoint`` take ``OUT`` without flags.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kure_jax._cli import parse_flags
from kure_jax.models.registry import MODEL_INPUT_SHAPES, get_model

__all__ = [
    "CONVERTIBLE",
    "convert_state_dict",
    "load_state_dict",
    "main",
    "write_checkpoint",
]

# kure_jax model name -> torchvision key of the classifier weight (whose rows give the class count).
CONVERTIBLE: Mapping[str, str] = {
    "resnet18": "fc.weight",
    "resnet50": "fc.weight",
    "mobilenet_v2": "classifier.1.weight",
}
_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin")
_IGNORED_SUFFIX = "num_batches_tracked"  # a BatchNorm counter, not part of the model's maths
# Flax leaf name -> torchvision parameter/buffer name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _resnet_module(path: Sequence[str], params: Mapping[str, Any]) -> str:
    """torchvision module name of a kure_jax ResNet module path (e.g. ``stage1_block2/conv1``)."""
    top = {"stem_conv": "conv1", "stem_norm": "bn1", "head": "fc"}
    if len(path) == 1 and path[0] in top:
        return top[path[0]]
    match = re.fullmatch(r"stage(\d+)_block(\d+)", path[0])
    if match is None or len(path) != 2:
        raise KeyError("/".join(path))
    stage, block = int(match[1]), int(match[2]) - 1  # torchvision counts blocks from 0
    inner = {"proj_conv": "downsample.0", "proj_norm": "downsample.1"}
    leaf = inner.get(path[1]) or re.sub(r"^norm(\d)$", r"bn\1", path[1])
    return f"layer{stage}.{block}.{leaf}"


def _mobilenet_module(path: Sequence[str], params: Mapping[str, Any]) -> str:
    """torchvision name of a kure_jax MobileNet-V2 module path (e.g. ``block3/depthwise_conv``)."""
    blocks = sum(1 for name in params if re.fullmatch(r"block\d+", name))
    top = {"stem_conv": "features.0.0", "stem_norm": "features.0.1",
           "last_conv": f"features.{blocks + 1}.0", "last_norm": f"features.{blocks + 1}.1",
           "head": "classifier.1"}
    if len(path) == 1 and path[0] in top:
        return top[path[0]]
    match = re.fullmatch(r"block(\d+)", path[0])
    if match is None or len(path) != 2:
        raise KeyError("/".join(path))
    # torchvision's InvertedResidual.conv is a Sequential: [expand ConvBNReLU,] depthwise
    # ConvBNReLU (each conv .0, BN .1), then the linear projection conv and its BN as two entries.
    if "expand_conv" in params[path[0]]:
        order = {"expand_conv": "0.0", "expand_norm": "0.1", "depthwise_conv": "1.0",
                 "depthwise_norm": "1.1", "project_conv": "2", "project_norm": "3"}
    else:
        order = {"depthwise_conv": "0.0", "depthwise_norm": "0.1", "project_conv": "1",
                 "project_norm": "2"}
    return f"features.{match[1]}.conv.{order[path[1]]}"


_MODULE_NAMES: Mapping[str, Callable[[Sequence[str], Mapping[str, Any]], str]] = {
    "resnet18": _resnet_module,
    "resnet50": _resnet_module,
    "mobilenet_v2": _mobilenet_module,
}


def _to_torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """torchvision shape of a kure_jax leaf of ``shape`` (HWIO -> OIHW, (in, out) -> (out, in))."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_torch_layout` on an array: OIHW -> HWIO, (out, in) -> (in, out)."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return value.T
    return value


def _check_arch(arch: str) -> None:
    if arch not in CONVERTIBLE:
        raise ValueError(
            f"unknown arch {arch!r}: torchvision weights convert for {sorted(CONVERTIBLE)}."
        )


def _abstract_variables(arch: str, num_classes: int, model_options: Mapping[str, Any]) -> dict:
    model = get_model(arch, num_classes=num_classes, **model_options)
    # Shapes only (no FLOPs, no memory): the variables the kure_jax model expects.
    shape = (1, *MODEL_INPUT_SHAPES[arch])
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                               jax.ShapeDtypeStruct(shape, jnp.float32)))


def convert_state_dict(
    arch: str,
    state_dict: Mapping[str, Any],
    *,
    model_options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Maps a torchvision state dict onto the variables of the kure_jax model ``arch``.

    Args:
      arch: one of :data:`CONVERTIBLE` (``"resnet18"``, ``"resnet50"``, ``"mobilenet_v2"``).
      state_dict: torchvision names -> arrays (NumPy, or anything ``np.asarray`` takes) in
        torch layout, e.g. from :func:`load_state_dict`. ``num_batches_tracked`` entries are
        ignored. The class count is read from the classifier weight's rows.
      model_options: fields of the kure_jax model (``kure_jax.models.get_model`` kwargs) for
        non-standard widths, e.g. ``{"stage_widths": (8, 16, 32, 64)}`` or
        ``{"width_mult": 0.5}``; the layout must still be torchvision's.

    Returns:
      ``{"params": ..., "batch_stats": ...}``: nested dicts of float32 NumPy arrays with the
      exact structure and shapes of ``get_model(arch, num_classes=n, **model_options).init``.

    Raises:
      ValueError: for an unknown ``arch``, or a state dict that does not match the model: the
        message names the first missing, unexpected and shape-mismatched torchvision key with
        the shapes found and expected, and how many of each there are.
    """
    _check_arch(arch)
    options = dict(model_options or {})
    arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    head_key = CONVERTIBLE[arch]
    if head_key not in arrays or arrays[head_key].ndim != 2:
        found = arrays[head_key].shape if head_key in arrays else "missing"
        raise ValueError(
            f"state dict does not match torchvision {arch}: its classifier weight {head_key!r} "
            f"(num_classes x features) is {found}."
        )
    num_classes = int(arrays[head_key].shape[0])
    abstract = _abstract_variables(arch, num_classes, options)
    module_name = _MODULE_NAMES[arch]
    out: dict[str, dict[str, Any]] = {}
    missing, mismatched, used = [], [], set()
    for collection in ("params", "batch_stats"):
        tree = abstract.get(collection, {})
        flat = {}
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            path = tuple(k.key for k in key_path)
            torch_key = f"{module_name(path[:-1], abstract['params'])}." \
                        f"{_LEAF_NAMES[collection, path[-1]]}"
            expected = _to_torch_layout(tuple(leaf.shape))
            where = f"{collection}/{'/'.join(path)}"
            if torch_key not in arrays:
                missing.append(f"{torch_key!r} (expected {expected}, for {where})")
                continue
            used.add(torch_key)
            value = arrays[torch_key]
            if value.shape != expected:
                mismatched.append(f"{torch_key!r} is {value.shape}, expected {expected} "
                                  f"(for {where})")
                continue
            flat[path] = np.ascontiguousarray(_from_torch_layout(value), dtype=np.float32)
        out[collection] = _unflatten(flat)
    unexpected = [f"{k!r} {arrays[k].shape}" for k in arrays
                  if k not in used and not k.endswith(_IGNORED_SUFFIX)]
    if missing or unexpected or mismatched:
        problems = [f"{len(items)} {kind} (first: {items[0]})" for kind, items in
                    (("missing", missing), ("unexpected", unexpected),
                     ("mismatched", mismatched)) if items]
        raise ValueError(
            f"state dict does not match torchvision {arch} ({num_classes} classes"
            f"{', ' + str(options) if options else ''}): " + "; ".join(problems) + "."
        )
    return out


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a torchvision state dict from disk, as NumPy arrays.

    Args:
      path: a ``.safetensors`` file (read with ``safetensors.numpy``, no torch needed), or a
        ``.pth``/``.pt``/``.bin`` file saved with ``torch.save(model.state_dict(), path)``
        (read with ``torch.load(..., weights_only=True)``; a dict holding the state dict under
        ``"state_dict"`` or ``"model"`` works too). A ``module.`` prefix on every key (from
        ``DataParallel``) is removed.

    Returns:
      Names -> arrays; floating tensors become float32 (bfloat16 has no NumPy dtype).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: for another suffix, or a file that holds no mapping of tensors.
      ImportError: for a ``.pth`` file without torch installed (the message suggests
        ``.safetensors``).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = dict(load_file(str(path)))
    elif path.suffix in _STATE_DICT_SUFFIXES:
        state = _load_torch(path)
    else:
        raise ValueError(
            f"weights file {path}: expected a .safetensors or {'/'.join(_STATE_DICT_SUFFIXES)} "
            "file (a torchvision state dict)."
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs torch (pip install -r requirements-torch.txt); without "
            "torch, save the state dict as .safetensors "
            "(safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'))."
        ) from err
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (names -> tensors).")
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy()
            for k, v in obj.items()}


def write_checkpoint(
    out_dir: str | pathlib.Path,
    variables: Mapping[str, Any],
    *,
    arch: str,
    model_options: Mapping[str, Any] | None = None,
    source: str = "",
    dataset: str = "imagenet2012",
) -> pathlib.Path:
    """Writes converted variables as a step-0 kure_jax checkpoint ``out_dir/checkpoints/0``.

    The layout of :class:`kure_jax.training.checkpoint.Checkpoints` (Orbax items ``state``,
    ``config``, ``meta``); ``state`` holds the variables, step 0, an empty optimizer state and
    a fixed RNG key, ``config`` the model, its options, class count, dtype float32, KURE off
    and QAT off, and ``pretrained`` (the source file), so ``out_dir`` works as
    ``config.init_from`` and as ``eval.py --checkpoint``.

    Args:
      out_dir: new directory (or an empty one).
      variables: ``{"params", "batch_stats"}`` from :func:`convert_state_dict`.
      arch: the kure_jax model name.
      model_options: the options the variables were converted with.
      source: where the weights came from (recorded in the config).
      dataset: the dataset name recorded for ``eval.py`` (torchvision's weights are ImageNet's).

    Returns:
      The step directory written.

    Raises:
      ValueError: for an unknown ``arch``.
      FileExistsError: if ``out_dir`` already holds checkpoints (nothing is overwritten).
    """
    import orbax.checkpoint as ocp  # deferred: `import kure_jax.models` stays free of Orbax

    _check_arch(arch)
    root = pathlib.Path(out_dir).absolute()
    if (root / "checkpoints").exists() and any((root / "checkpoints").iterdir()):
        raise FileExistsError(f"{root} already holds checkpoints; choose a new --out directory.")
    head = variables["params"]["head"]["kernel"]
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in (model_options or {}).items()}
    config = {
        "model": arch, "model_options": options, "num_classes": int(np.shape(head)[-1]),
        "dtype": "float32", "dataset": dataset, "dataset_options": {},
        "kure": {"lambda_": 0.0, "target": 1.8, "selection": "paper", "reduction": "mean",
                 "penalty_impl": "auto"},
        "qat": {"enabled": False},
        "init_from": None,
        "pretrained": {"format": "torchvision", "source": source},
    }
    meta = {"image_shape": list(MODEL_INPUT_SHAPES[arch]), "steps_per_epoch": 0, "num_steps": 0,
            "converted_from": source}
    tree = {
        "step": np.zeros((), np.int32),
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "quant": {},
        "opt_state": {},
        "rng": np.asarray(jax.random.key_data(jax.random.key(0))),
    }
    json.dumps(config)  # fail here, not half-way through the write, on a non-JSON option
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(root / "checkpoints", item_handlers=handlers,
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                config=ocp.args.JsonSave(config),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    return root / "checkpoints" / "0"


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("arch", None, f"one of {sorted(CONVERTIBLE)}", flag_values=fv,
                        required=True)
    flags.DEFINE_string("weights", None, "torchvision state dict: .safetensors, or .pth with "
                        "torch installed", flag_values=fv, required=True)
    flags.DEFINE_string("out", None, "new output directory (the checkpoint)", flag_values=fv,
                        required=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code: 0 written, 2 bad arch/file/state dict.

    Errors are one ``error:`` line on stderr (no traceback).
    """
    args = parse_flags(argv, _define_flags, prog="python -m kure_jax.models.convert",
                       description="Convert torchvision ResNet-18/50 or MobileNet-V2 weights "
                                   "into a kure_jax checkpoint (no download).")
    try:
        _check_arch(args.arch)
        state = load_state_dict(args.weights)
        variables = convert_state_dict(args.arch, state)
        step_dir = write_checkpoint(args.out, variables, arch=args.arch,
                                    source=str(pathlib.Path(args.weights).absolute()))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    count = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
    classes = variables["params"]["head"]["kernel"].shape[-1]
    print(f"wrote {step_dir}: {args.arch}, {classes} classes, {count:,} params.\n"
          f"fine-tune: python train.py --config configs/imagenet_{args.arch}_kure.py "
          f"--config.init_from={args.out}\nevaluate:  python eval.py --checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
