"""Integer weights you can ship: the codes, steps and zero points of a ``QuantPolicy``.

:func:`integer_codes` turns one float tensor into the integers that ``kure_jax.quantize``
rounds it to; :func:`export_integer_weights` writes those of every selected leaf of a params
pytree to one safetensors file, :func:`load_integer_weights` reads them back and
:func:`dequantize` turns them into floats that equal ``quantize_params`` with the same policy
bit for bit (``tests/test_deploy_export.py``).

File layout (safetensors, little-endian, no pickles). For each exported leaf ``P`` (its
``/``-joined path, e.g. ``params/conv1/kernel``):

* ``P:codes``: the integer codes. ``layout`` (in the header) says how they are stored:

  - ``"int8"`` / ``"uint8"``: one code per byte, the leaf's shape (bits 2..8; signed codes as
    int8, unsigned as uint8, so 2- and 3-bit codes also take a byte each);
  - ``"int4_packed"`` / ``"uint4_packed"``: 4-bit codes two per byte, shape ``(ceil(n / 2),)``
    with ``n`` the leaf's size in C order; element ``2i`` in the low nibble and ``2i + 1`` in
    the high one (ONNX's INT4 order), signed nibbles in two's complement, an odd tail padded
    with 0.

* ``P:scale``: float32 step ``D``, shape ``()`` per tensor or the leaf's rank with size 1 on
  every axis but the channel axes (so it broadcasts against the codes).
* ``P:zero_point``: int32 zero point ``z``, the shape of ``P:scale`` (0 for symmetric policies).
* ``P`` alone: a leaf that is not quantised, stored as is (only with ``include_unselected``).

The dequantised value is ``(code - z) * D`` in float32, cast to the leaf's dtype.

The ``__metadata__`` header holds ``format`` (``"kure_jax.integer_weights"``), ``version``
(``"1"``), ``policy`` (``QuantPolicy.name``) and ``tensors``: a JSON object mapping each ``P``
to ``{"layout", "bits", "signed", "symmetric", "narrow_range", "axis" (list or null), "qmin",
"qmax", "shape", "dtype"}``; ``float_tensors`` lists the unquantised leaves.

Command line (prints what it wrote: tensors, bytes, compression vs float32)::

    python -m kure_jax.deploy.export --checkpoint=WORKDIR --bits=4 --axis=-1 --out=w4.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kure_jax import selection
from kure_jax._cli import parse_flags
from kure_jax.quant.ops import integer_range, round_values
from kure_jax.quant.policy import QuantPolicy, compute_step, kept_axes

__all__ = [
    "FORMAT",
    "MAX_EXPORT_BITS",
    "IntegerTensor",
    "IntegerWeights",
    "dequantize",
    "export_integer_weights",
    "integer_codes",
    "load_integer_weights",
    "main",
    "pack_int4",
    "unpack_int4",
]

FORMAT = "kure_jax.integer_weights"
VERSION = "1"
MAX_EXPORT_BITS = 8  # codes are stored in (at most) one byte each
PyTree = Any


class IntegerTensor(NamedTuple):
    """The integer form of one quantised tensor.

    Attributes:
      codes: int8 (signed) or uint8 (unsigned) array of the tensor's shape, values in
        ``[qmin, qmax]`` (unpacked, whatever the file layout).
      scale: float32 step, shape ``()`` or the tensor's rank with 1 on the reduced axes.
      zero_point: int32 zero point, the shape of ``scale``.
      bits: code width in [2, 8].
      signed: whether the codes are signed.
      axis: the policy's channel axes (non-negative), or ``None`` per tensor.
      dtype: the float dtype the tensor is dequantised to (e.g. ``"float32"``).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    signed: bool
    axis: tuple[int, ...] | None
    dtype: str


@dataclasses.dataclass(frozen=True)
class IntegerWeights:
    """What :func:`load_integer_weights` reads from a file.

    Attributes:
      tensors: leaf path (``"params/conv1/kernel"``) -> :class:`IntegerTensor`.
      float_tensors: path -> array of the leaves stored unquantised.
      metadata: the file's JSON header, decoded (``"tensors"`` is a dict).
    """

    tensors: dict[str, IntegerTensor]
    float_tensors: dict[str, np.ndarray]
    metadata: dict[str, Any]


def _check_exportable(policy: QuantPolicy) -> None:
    if not isinstance(policy, QuantPolicy):
        raise ValueError(f"policy must be a QuantPolicy; got {type(policy).__name__}.")
    if policy.bits > MAX_EXPORT_BITS:
        raise ValueError(
            f"integer export stores codes in int8/uint8 (int4 packed); bits={policy.bits} does "
            f"not fit: use bits in 2..{MAX_EXPORT_BITS}."
        )
    if policy.rounding == "stochastic":
        raise ValueError(
            "integer export needs a deterministic rounding; got rounding='stochastic'.")
    if policy.bias_correction:
        # The corrected values lie off the integer grid, so no (codes, step, zero point) holds them.
        raise ValueError("integer export cannot hold bias_correction=True (values leave the grid).")


def _narrow(policy: QuantPolicy) -> bool:
    # Same rule as kure_jax.quant.policy: narrow_range only applies to symmetric signed grids.
    return policy.narrow_range and policy.symmetric and policy.signed


def integer_codes(x: jax.Array | np.ndarray, policy: QuantPolicy) -> IntegerTensor:
    """The codes, step and zero point that ``kure_jax.quantize(x, policy)`` rounds ``x`` to.

    ``codes = clip(round(x / D) + z, qmin, qmax)`` with ``(D, z) = compute_step(x, policy)``,
    computed with the same operations as ``quantize``, so that ``(codes - z) * D`` equals its
    output exactly.

    Args:
      x: floating array of any shape.
      policy: the quantizer; bits in [2, 8], deterministic rounding, no bias correction.

    Returns:
      An :class:`IntegerTensor` (codes int8 if ``policy.signed`` else uint8).

    Raises:
      ValueError: for a policy the format cannot hold (``bits > 8``, stochastic rounding,
        bias correction), or as ``compute_step`` (non-floating/empty/non-finite ``x``, an
        ``axis`` out of range).
    """
    _check_exportable(policy)
    x = jnp.asarray(x)
    scale, zero_point = compute_step(x, policy)
    qmin, qmax = integer_range(policy.bits, policy.signed, narrow_range=_narrow(policy))
    v = x.astype(scale.dtype) / scale
    q = jnp.clip(round_values(v, policy.rounding) + zero_point, qmin, qmax)
    code_dtype = np.int8 if policy.signed else np.uint8
    axis = None if policy.axis is None else kept_axes(policy.axis, x.ndim)
    return IntegerTensor(
        codes=np.asarray(q).astype(code_dtype),
        scale=np.asarray(scale, np.float32),
        zero_point=np.asarray(zero_point).astype(np.int32),
        bits=policy.bits,
        signed=policy.signed,
        axis=axis,
        dtype=str(x.dtype),
    )


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Packs 4-bit codes two per byte (C order, element ``2i`` in the low nibble).

    Args:
      codes: integer array of any shape with values in ``[-8, 7]`` or ``[0, 15]``.

    Returns:
      uint8 array of shape ``(ceil(codes.size / 2),)``; an odd tail is padded with 0.

    Raises:
      ValueError: if a value does not fit in 4 bits.
    """
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 15):
        raise ValueError(f"4-bit codes must lie in [-8, 15]; got [{flat.min()}, {flat.max()}].")
    nibbles = (flat & 0xF).astype(np.uint8)  # two's complement for negative codes
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: Sequence[int], *, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 (``signed``) or uint8 codes of ``shape``.

    Raises:
      ValueError: if ``packed`` does not hold ``prod(shape)`` nibbles.
    """
    packed = np.asarray(packed, np.uint8).reshape(-1)
    n = math.prod(shape)
    if packed.size != (n + 1) // 2:
        raise ValueError(f"{packed.size} packed bytes cannot hold {n} 4-bit codes of {shape}.")
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:n]
    if signed:
        return np.where(nibbles >= 8, nibbles.astype(np.int16) - 16, nibbles).astype(
            np.int8).reshape(shape)
    return nibbles.astype(np.uint8).reshape(shape)


def _layout(bits: int, signed: bool) -> str:
    base = "int" if signed else "uint"
    return f"{base}4_packed" if bits == 4 else f"{base}8"


def _named_leaves(params: PyTree) -> list[tuple[str, Any, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), path, leaf)
            for path, leaf in leaves]


def _chosen(
    params: PyTree, where: selection.Selection, leaves: Sequence[str] | None
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """``(quantised, other)`` lists of ``(path string, leaf)``."""
    mask = selection.selection_mask(params, where)
    flags = jax.tree_util.tree_leaves(mask)
    named = _named_leaves(params)
    selected = {name for (name, _, _), flag in zip(named, flags, strict=True) if flag}
    if leaves is not None:
        known = {name for name, _, _ in named}
        for name in leaves:
            if name not in known:
                raise ValueError(f"no leaf {name!r} in params; leaves: {sorted(known)}.")
            if name not in selected:
                raise ValueError(
                    f"leaf {name!r} is not selected by the policy's selection (selected: "
                    f"{sorted(selected)}); widen where= to export it."
                )
        selected = set(leaves)
    quantised = [(name, leaf) for name, _, leaf in named if name in selected]
    other = [(name, leaf) for name, _, leaf in named if name not in selected]
    return quantised, other


def export_integer_weights(
    params: PyTree,
    policy: QuantPolicy,
    path: str | pathlib.Path,
    *,
    where: selection.Selection = None,
    leaves: Sequence[str] | None = None,
    include_unselected: bool = True,
) -> dict[str, Any]:
    """Writes the integer codes of the selected leaves of ``params`` to a safetensors file.

    Args:
      params: a pytree of arrays (a Flax ``params`` dict, or ``{"params": ..., ...}``).
      policy: the quantizer, as for ``quantize_params`` (bits 2..8, deterministic rounding).
      path: the output file (conventionally ``*.safetensors``); its directory must exist.
      where: the leaf selection, as for ``quantize_params`` (default: conv/dense kernels).
      leaves: optional explicit leaf paths (``"params/conv1/kernel"``) to export, each of which
        must be selected by ``where``; ``None`` exports every selected leaf.
      include_unselected: also store the other leaves (biases, BatchNorm, ...) as float, so the
        file alone rebuilds the whole pytree with :func:`dequantize`.

    Returns:
      A summary: ``{"path", "tensors" (number of quantised leaves), "float_tensors",
      "bytes" (file size), "quantized_bytes" (codes + steps + zero points),
      "float32_bytes" (those leaves as float32), "compression" (float32 / quantized)}``.

    Raises:
      ValueError: for a policy the format cannot hold, a selection that matches nothing, an
        explicit leaf that does not exist or is not selected, or a leaf ``compute_step``
        refuses (the message names the leaf).
      ImportError: if the ``safetensors`` package is missing.
    """
    safetensors_numpy = _safetensors_numpy()
    _check_exportable(policy)
    quantised, other = _chosen(params, where, leaves)
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    quantized_bytes = float32_bytes = 0
    for name, leaf in quantised:
        try:
            t = integer_codes(leaf, policy)
        except ValueError as err:
            raise ValueError(f"leaf {name!r} of shape {tuple(np.shape(leaf))}: {err}") from None
        layout = _layout(t.bits, t.signed)
        codes = pack_int4(t.codes) if t.bits == 4 else t.codes
        tensors[f"{name}:codes"] = np.ascontiguousarray(codes)
        tensors[f"{name}:scale"] = np.ascontiguousarray(t.scale)
        tensors[f"{name}:zero_point"] = np.ascontiguousarray(t.zero_point)
        qmin, qmax = integer_range(t.bits, t.signed, narrow_range=_narrow(policy))
        entries[name] = {
            "layout": layout, "bits": t.bits, "signed": t.signed, "symmetric": policy.symmetric,
            "narrow_range": _narrow(policy), "axis": None if t.axis is None else list(t.axis),
            "qmin": qmin, "qmax": qmax, "shape": list(t.codes.shape), "dtype": t.dtype,
        }
        quantized_bytes += codes.nbytes + t.scale.nbytes + t.zero_point.nbytes
        float32_bytes += t.codes.size * 4
    float_names = []
    if include_unselected:
        for name, leaf in other:
            tensors[name] = np.ascontiguousarray(np.asarray(leaf))
            float_names.append(name)
    metadata = {"format": FORMAT, "version": VERSION, "policy": policy.name,
                "tensors": json.dumps(entries), "float_tensors": json.dumps(float_names)}
    path = pathlib.Path(path)
    safetensors_numpy.save_file(tensors, str(path), metadata=metadata)
    return {
        "path": str(path), "tensors": len(entries), "float_tensors": len(float_names),
        "bytes": path.stat().st_size, "quantized_bytes": quantized_bytes,
        "float32_bytes": float32_bytes,
        "compression": float32_bytes / quantized_bytes if quantized_bytes else float("nan"),
    }


def load_integer_weights(path: str | pathlib.Path) -> IntegerWeights:
    """Reads a file written by :func:`export_integer_weights` (codes unpacked).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a kure_jax integer-weights file of a known version.
      ImportError: if the ``safetensors`` package is missing.
    """
    _safetensors_numpy()
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no integer-weights file at {path}.")
    with safe_open(str(path), framework="np") as f:
        raw_meta = f.metadata() or {}
        if raw_meta.get("format") != FORMAT or raw_meta.get("version") != VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT} v{VERSION} file (header format="
                f"{raw_meta.get('format')!r}, version={raw_meta.get('version')!r})."
            )
        entries = json.loads(raw_meta["tensors"])
        float_names = json.loads(raw_meta["float_tensors"])
        tensors = {}
        for name, e in entries.items():
            stored = f.get_tensor(f"{name}:codes")
            if e["layout"].endswith("4_packed"):
                codes = unpack_int4(stored, e["shape"], signed=e["signed"])
            else:
                codes = stored.reshape(e["shape"])
            axis = None if e["axis"] is None else tuple(e["axis"])
            # safetensors stores a 0-d array as shape (1,): restore the broadcastable shape.
            step_shape = () if axis is None else tuple(
                n if i in axis else 1 for i, n in enumerate(e["shape"]))
            tensors[name] = IntegerTensor(
                codes=codes, scale=f.get_tensor(f"{name}:scale").reshape(step_shape),
                zero_point=f.get_tensor(f"{name}:zero_point").reshape(step_shape),
                bits=e["bits"], signed=e["signed"], axis=axis, dtype=e["dtype"],
            )
        floats = {name: f.get_tensor(name) for name in float_names}
    metadata = {**raw_meta, "tensors": entries, "float_tensors": float_names}
    return IntegerWeights(tensors=tensors, float_tensors=floats, metadata=metadata)


def _dequantize_one(t: IntegerTensor) -> np.ndarray:
    # float32 (code - z) * D: both steps are exact IEEE operations, as in quant.fake_quant, so
    # the result has the same bits as kure_jax.quantize's output.
    values = (t.codes.astype(np.float32) - t.zero_point.astype(np.float32)) * t.scale
    return values.astype(jnp.dtype(t.dtype))


def dequantize(
    weights: IntegerWeights | str | pathlib.Path, params: PyTree | None = None
) -> PyTree:
    """Float weights from integer ones: ``(codes - zero_point) * scale``, cast to each dtype.

    Args:
      weights: an :class:`IntegerWeights` or the path of a file to load.
      params: optional pytree to fill: its leaves whose paths were exported are replaced by
        the dequantised arrays (same structure, other leaves as they are). Without it a nested
        dict is built from the file's paths (quantised and float leaves).

    Returns:
      The float pytree (NumPy arrays).

    Raises:
      ValueError: if an exported tensor's shape differs from the leaf it replaces.
    """
    if not isinstance(weights, IntegerWeights):
        weights = load_integer_weights(weights)
    arrays = {name: _dequantize_one(t) for name, t in weights.tensors.items()}
    if params is None:
        tree: dict[str, Any] = {}
        for name, value in {**weights.float_tensors, **arrays}.items():
            *parents, last = name.split("/")
            node = tree
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        return tree
    out = []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    for key_path, leaf in leaves:
        name = jax.tree_util.keystr(key_path, simple=True, separator="/")
        if name in arrays:
            if tuple(arrays[name].shape) != tuple(np.shape(leaf)):
                raise ValueError(f"exported {name!r} has shape {arrays[name].shape}; the leaf it "
                                 f"replaces has {tuple(np.shape(leaf))}.")
            out.append(arrays[name])
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _safetensors_numpy() -> Any:
    try:
        import safetensors.numpy as safetensors_numpy
    except ImportError as err:
        raise ImportError("integer export needs the 'safetensors' package: pip install "
                          "safetensors") from err
    return safetensors_numpy


def _parse_axis(text: str) -> int | tuple[int, ...] | None:
    if text.lower() in ("none", "tensor", "per-tensor"):
        return None
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "workdir, checkpoint directory or step directory "
                        "(restore_for_eval)", flag_values=fv, required=True)
    flags.DEFINE_enum("which", "best", ["best", "latest"], "which checkpoint", flag_values=fv)
    flags.DEFINE_string("out", None, "output .safetensors file", flag_values=fv, required=True)
    flags.DEFINE_integer("bits", 8, "code width, 2..8", flag_values=fv)
    flags.DEFINE_string("axis", "-1", "channel axis/axes ('-1', '0,3') or 'none' for per-tensor",
                        flag_values=fv)
    flags.DEFINE_boolean("asymmetric", False, "affine range with a zero point", flag_values=fv)
    flags.DEFINE_boolean("unsigned", False, "unsigned codes", flag_values=fv)
    flags.DEFINE_string("clip", "max", "QuantPolicy.clip", flag_values=fv)
    flags.DEFINE_multi_string("leaf", None, "export only this leaf path (repeatable), e.g. "
                              "params/conv1/kernel", flag_values=fv)
    flags.DEFINE_boolean("kernels_only", False, "do not store the unquantised leaves (biases, "
                         "BatchNorm)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 with a one-line error).

    Flags are absl flags (``--kernels_only``, ``--leaf=a --leaf=b``; ``--help`` lists them).

    Args:
      argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = parse_flags(argv, _define_flags, prog="python -m kure_jax.deploy.export",
                       description="Write a checkpoint's quantised kernels as integer codes "
                                   "(safetensors).")
    try:
        policy = QuantPolicy(bits=args.bits, axis=_parse_axis(args.axis),
                             symmetric=not args.asymmetric, signed=not args.unsigned,
                             clip=args.clip)
        _check_exportable(policy)
        # Deferred: the training package pulls in Orbax, which the library functions never need.
        from kure_jax.training import checkpoint

        if not pathlib.Path(args.checkpoint).exists():
            raise FileNotFoundError(f"No checkpoint under {args.checkpoint}: it does not exist.")
        _, _, variables = checkpoint.restore_for_eval(args.checkpoint, which=args.which)
        params = {"params": variables["params"]}
        if not args.kernels_only and "batch_stats" in variables:
            params["batch_stats"] = variables["batch_stats"]
        summary = export_integer_weights(
            params, policy, args.out, leaves=args.leaf, include_unselected=not args.kernels_only)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['path']}: {summary['tensors']} integer tensors ({policy.name}), "
          f"{summary['float_tensors']} float tensors, {summary['bytes']:,} bytes; quantised "
          f"tensors {summary['quantized_bytes']:,} bytes vs {summary['float32_bytes']:,} as "
          f"float32 ({summary['compression']:.2f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
