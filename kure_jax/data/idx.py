"""A reader of the IDX file format of MNIST and Fashion-MNIST (no TensorFlow).

An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a header followed by the
array in C order, every number big-endian::

    bytes 0-1   0x00 0x00                  magic
    byte  2     dtype code                 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                                           0x0D float32, 0x0E float64
    byte  3     ndim                       number of dimensions, >= 1
    4 * ndim    uint32 sizes               e.g. 60000, 28, 28 for MNIST's training images
    ...         the elements

The distributed files are gzip-compressed (``train-images-idx3-ubyte.gz``); :func:`read_idx`
reads both forms, recognising gzip by its own magic bytes rather than by the file name.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Final

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx"]

# dtype code -> big-endian element type.
IDX_DTYPES: Final = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file, gzip-compressed or not.

    Args:
      path: the file, e.g. ``.../train-images-idx3-ubyte.gz``.

    Returns:
      The array with the header's shape, in the header's type as a native-endian NumPy
      dtype (uint8 for MNIST images and labels), e.g. uint8 ``(60000, 28, 28)``.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file, for a header that is not IDX (magic bytes other than
        ``00 00``, an unknown dtype code, zero dimensions, a header cut short), data shorter
        or longer than the header's shape, or a damaged gzip stream.
    """
    with open(path, "rb") as file:
        raw = file.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: damaged gzip stream ({err}).") from err
    return _parse(raw, os.fspath(path))


def _parse(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(
            f"{name} is not an IDX file: it starts with {raw[:4].hex(' ') or 'nothing'}, "
            "not 00 00 <dtype code> <ndim>."
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02X} (known: {known}).")
    if ndim == 0:
        raise ValueError(f"{name}: the IDX header declares 0 dimensions.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{name}: the IDX header declares {ndim} dimensions but the file has only "
            f"{len(raw)} bytes, fewer than the {header} of the header."
        )
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        kind = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise ValueError(
            f"{name} is {kind}: shape {shape} of {dtype.newbyteorder('=').name} needs "
            f"{expected} bytes of data after the {header}-byte header; it has "
            f"{len(raw) - header}."
        )
    array = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
