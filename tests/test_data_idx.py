"""kure_jax.data.idx.read_idx on IDX files this test writes byte by byte (with ``struct``)."""

import gzip
import struct

import numpy as np
import pytest

from kure_jax.data.idx import read_idx

# IDX type codes and the big-endian struct formats of their elements (LeCun's format page).
CODES = {np.uint8: (0x08, "B"), np.int8: (0x09, "b"), np.int16: (0x0B, "h"),
         np.int32: (0x0C, "i"), np.float32: (0x0D, "f"), np.float64: (0x0E, "d")}


def _idx_bytes(values, shape, code, fmt):
    """An IDX file built with struct, independently of NumPy's byte-order handling."""
    header = struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return header + struct.pack(f">{len(values)}{fmt}", *values)


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_reads_every_dtype_plain_and_gzipped(tmp_path, dtype, compress):
    code, fmt = CODES[dtype]
    shape = (2, 3, 4)
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = [int(v) for v in rng.integers(info.min, info.max, 24, endpoint=True)]
    else:
        values = [float(v) for v in rng.normal(size=24).astype(dtype)]
    raw = _idx_bytes(values, shape, code, fmt)
    path = tmp_path / "x-idx3"  # no .gz suffix even when gzipped: content decides
    path.write_bytes(gzip.compress(raw) if compress else raw)
    got = read_idx(path)
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got.ravel(), np.array(values, dtype))


def test_one_dimensional_labels_and_large_sizes(tmp_path):
    # MNIST's label files: code 0x08, 1 dimension; sizes are unsigned 32-bit big-endian.
    labels = [7, 2, 1, 0, 4]
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(labels, (5,), 0x08, "B"))
    np.testing.assert_array_equal(read_idx(str(path)), np.array(labels, np.uint8))
    header = struct.pack(">BBBB", 0, 0, 0x08, 1) + struct.pack(">I", 70000)
    (tmp_path / "big").write_bytes(header + bytes(70000))
    assert read_idx(tmp_path / "big").shape == (70000,)


@pytest.mark.parametrize("raw, message", [
    (b"\x1f\x00\x08\x01\x00\x00\x00\x01\x00", "is not an IDX file: it starts with 1f 00 08 01"),
    (b"\x00\x00\x08", "is not an IDX file"),
    (b"", "starts with nothing"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX dtype code 0x07"),
    (b"\x00\x00\x08\x00", "declares 0 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", "has only 10 bytes, fewer than the 16"),
])
def test_bad_headers_name_the_file_and_the_problem(tmp_path, raw, message):
    path = tmp_path / "bad"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_and_overlong_data(tmp_path):
    raw = _idx_bytes(list(range(12)), (3, 4), 0x0B, "h")  # 24 bytes of int16 data
    path = tmp_path / "data"
    path.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"truncated: shape \(3, 4\) of int16 needs 24 bytes.*23"):
        read_idx(path)
    path.write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="longer than its header says"):
        read_idx(path)
    # A gzip stream cut short is a damaged file, not a short array.
    path.write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match="damaged gzip stream"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing-here")
