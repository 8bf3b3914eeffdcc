"""Weights in a data type's packed layout (MXFP4/6/8, MXINT8, NVFP4, FP8, block INT4/8, NF4).

:func:`export_format_weights` writes the selected leaves of a params pytree, quantised by
:func:`kure_jax.quant.formats.encode`, to one safetensors file; :func:`load_format_weights`
reads the codes and scales back as :class:`~kure_jax.quant.formats.Encoded`, and
:func:`dequantize_format_weights` gives floats equal to ``quantize_params(params, fmt)`` bit for
bit (``tests/test_quant_formats.py``).

File layout (safetensors, little-endian), per exported leaf ``P`` (its ``/``-joined path):

* ``P:codes``: the element codes, uint8. FP8: one code per byte (the OCP bit pattern); FP6: one
  code per byte in the low 6 bits (not packed 4 per 3 bytes); FP4 E2M1, INT4 and NF4: two codes
  per byte in C order, element ``2i`` in the low nibble (FP4: its bit pattern, INT4: two's
  complement, NF4: the level's index 0..15), an odd tail padded with 0; INT8: the int8 code's
  byte.
* ``P:scales``: one per group (``Encoded.scales``' shape). ``"mx"``: E8M0 codes (uint8,
  ``2^(code - 127)``; MXINT8's in the spec's convention, elements in units of 2^-6);
  ``"nvfp4"``: E4M3 codes (uint8); ``"absmax"``: float32.
* ``P:tensor_scale``: float32 scalar (NVFP4's per-tensor scale; 1 otherwise).

The ``__metadata__`` header holds ``format`` (``"kure_jax.format_weights"``), ``version``
(``"1"``) and ``tensors``: JSON mapping each ``P`` to ``{"format": Format fields, "shape",
"dtype"}``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_dtypes
import numpy as np

from kure_jax import selection
from kure_jax.deploy.export import pack_int4, unpack_int4
from kure_jax.quant import formats

__all__ = [
    "FORMAT",
    "dequantize_format_weights",
    "export_format_weights",
    "load_format_weights",
]

FORMAT = "kure_jax.format_weights"
VERSION = "1"
_FLOAT_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
                 "fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
                 "fp4_e2m1": ml_dtypes.float4_e2m1fn}
_MXINT8_UNIT = 6  # The spec's MXINT8 elements are 1.6 fixed point: its exponent is ours + 6.


def _safetensors_numpy() -> Any:
    try:
        import safetensors.numpy as safetensors_numpy
    except ImportError as err:
        raise ImportError("format export needs the 'safetensors' package: pip install "
                          "safetensors") from err
    return safetensors_numpy


def _element_codes(values: np.ndarray, element: str) -> np.ndarray:
    """uint8 codes of element values (on the grid), packed two per byte for 4-bit elements."""
    if element in _FLOAT_DTYPES:
        codes = values.astype(np.float32).astype(_FLOAT_DTYPES[element]).view(np.uint8)
        return pack_int4(codes.astype(np.int16)) if element == "fp4_e2m1" else codes
    if element == "nf4":
        levels = formats.element_levels("nf4")
        return pack_int4(np.searchsorted(levels, values.astype(np.float64)))
    codes = values.astype(np.int16)
    return pack_int4(codes) if element == "int4" else codes.astype(np.int8).view(np.uint8)


def _element_values(codes: np.ndarray, element: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_element_codes`: float32 element values of ``shape``."""
    if element == "fp4_e2m1":
        codes = unpack_int4(codes, shape, signed=False)
    if element in _FLOAT_DTYPES:
        return codes.reshape(shape).view(_FLOAT_DTYPES[element]).astype(np.float32)
    if element == "nf4":
        return formats.element_levels("nf4")[unpack_int4(codes, shape, signed=False)].astype(
            np.float32)
    if element == "int4":
        return unpack_int4(codes, shape, signed=True).astype(np.float32)
    return codes.reshape(shape).view(np.int8).astype(np.float32)


def _scale_codes(scales: np.ndarray, fmt: formats.Format) -> np.ndarray:
    if fmt.scale == "mx":
        # A flushed 2^-127 (all-zero block) reads 0: code 0 is 2^-127.
        exp = np.where(scales > 0, np.log2(np.where(scales > 0, scales, 1.0)), -127)
        exp = exp + (_MXINT8_UNIT if fmt.element == "int8" else 0)
        return (np.round(exp).astype(np.int16) + 127).astype(np.uint8)
    if fmt.scale == "nvfp4":
        return scales.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return scales.astype(np.float32)


def _scale_values(codes: np.ndarray, fmt: formats.Format) -> np.ndarray:
    if fmt.scale == "mx":
        exp = codes.astype(np.int16) - 127 - (_MXINT8_UNIT if fmt.element == "int8" else 0)
        return np.ldexp(np.float32(1), exp).astype(np.float32)
    if fmt.scale == "nvfp4":
        return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return codes.astype(np.float32)


def export_format_weights(
    params: Any,
    fmt: str | formats.Format,
    path: str | pathlib.Path,
    *,
    where: selection.LeafPredicate | None = None,
) -> dict[str, Any]:
    """Writes the selected leaves of ``params`` in ``fmt``'s packed layout to ``path``.

    Args:
      params: a pytree of arrays (e.g. a Flax ``{"params": ...}`` dict).
      fmt: a :class:`~kure_jax.quant.formats.Format` or preset name.
      path: the safetensors file to write.
      where: leaf selection as in ``quantize_params`` (``None``: conv/dense kernels).

    Returns:
      ``{"path", "tensors", "bytes", "quantized_bytes", "float32_bytes", "compression"}``.

    Raises:
      ValueError: for an unknown format, a selection that matches nothing or a leaf the format
        refuses (the message names the leaf).
      ImportError: if the ``safetensors`` package is missing.
    """
    fmt = formats.get_format(fmt)
    safetensors_numpy = _safetensors_numpy()
    mask = selection.selection_mask(params, where)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    tensors, entries, quantized, float32 = {}, {}, 0, 0
    for (key_path, leaf), chosen in zip(leaves, treedef.flatten_up_to(mask), strict=True):
        if not chosen:
            continue
        name = jax.tree_util.keystr(key_path, simple=True, separator="/")
        try:
            enc = formats.encode(leaf, fmt)
        except ValueError as err:
            raise ValueError(f"leaf {name!r} of shape {tuple(np.shape(leaf))}: {err}") from None
        values = np.asarray(enc.elements)
        tensors[f"{name}:codes"] = np.ascontiguousarray(_element_codes(values, fmt.element))
        tensors[f"{name}:scales"] = np.ascontiguousarray(
            _scale_codes(np.asarray(enc.scales), fmt))
        tensors[f"{name}:tensor_scale"] = np.asarray(enc.tensor_scale, np.float32)
        entries[name] = {"format": dataclasses.asdict(fmt), "shape": list(values.shape),
                         "dtype": str(np.asarray(leaf).dtype)}
        quantized += sum(tensors[f"{name}:{p}"].nbytes for p in ("codes", "scales",
                                                                   "tensor_scale"))
        float32 += values.size * 4
    metadata = {"format": FORMAT, "version": VERSION, "tensors": json.dumps(entries)}
    path = pathlib.Path(path)
    safetensors_numpy.save_file(tensors, str(path), metadata=metadata)
    return {"path": str(path), "tensors": len(entries), "bytes": path.stat().st_size,
            "quantized_bytes": quantized, "float32_bytes": float32,
            "compression": float32 / quantized if quantized else float("nan")}


def load_format_weights(
    path: str | pathlib.Path,
) -> dict[str, tuple[formats.Encoded, formats.Format, str]]:
    """Reads a file of :func:`export_format_weights`: per leaf ``(Encoded, Format, dtype)``.

    Raises:
      ValueError: if the file is not a kure_jax format-weights file of a known version.
      ImportError: if the ``safetensors`` package is missing.
    """
    _safetensors_numpy()
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file (header: "
                             f"{meta.get('format')!r} v{meta.get('version')!r}).")
        out = {}
        for name, entry in json.loads(meta["tensors"]).items():
            fmt = formats.Format(**entry["format"])
            shape = tuple(entry["shape"])
            values = _element_values(f.get_tensor(f"{name}:codes"), fmt.element, shape)
            scales = _scale_values(f.get_tensor(f"{name}:scales"), fmt)
            tensor_scale = np.float32(f.get_tensor(f"{name}:tensor_scale"))
            out[name] = (formats.Encoded(values, scales, tensor_scale), fmt, entry["dtype"])
    return out


def dequantize_format_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The float leaves of a file of :func:`export_format_weights`, by leaf path, in each leaf's
    own dtype: equal to ``quantize_params(params, fmt)``'s leaves bit for bit.

    Raises:
      ValueError, ImportError: as :func:`load_format_weights`.
    """
    return {name: np.asarray(formats.decode(enc, fmt)).astype(dtype)
            for name, (enc, fmt, dtype) in load_format_weights(path).items()}
