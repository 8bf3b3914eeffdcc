"""Packed data-type export (kure_jax.deploy.format_export): the file's round trip equals
quantize_params with the same format bit for bit, and the codes have the documented layout."""

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kure_jax.deploy import format_export
from kure_jax.quant import formats
from kure_jax.quant.ptq import quantize_params


def _params():
    rng = np.random.default_rng(0)
    return {"params": {
        "conv": {"kernel": rng.standard_normal((3, 3, 40, 8)).astype(np.float32),
                 "bias": np.zeros(8, np.float32)},
        "dense": {"kernel": jnp.asarray(rng.standard_normal((70, 10)), jnp.bfloat16)}}}


@pytest.mark.parametrize("preset", sorted(formats.PRESETS))
def test_round_trip_equals_quantize_params(tmp_path, preset):
    params = _params()
    summary = format_export.export_format_weights(params, preset, tmp_path / "w.safetensors")
    assert summary["tensors"] == 2
    got = format_export.dequantize_format_weights(tmp_path / "w.safetensors")
    want = quantize_params(params, preset)["params"]
    for layer in ("conv", "dense"):
        a, b = got[f"params/{layer}/kernel"], np.asarray(want[layer]["kernel"])
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_mxfp4_codes_and_e8m0_scales(tmp_path):
    x = np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32)
    format_export.export_format_weights({"w": x}, "mxfp4", tmp_path / "w.safetensors",
                                        where=lambda path, leaf: True)
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "w.safetensors"))
    assert t["w:codes"].dtype == np.uint8 and t["w:codes"].size == math.ceil(x.size / 2)
    # E8M0 code = floor(log2 amax) - 2 + 127 per block of 32 along axis 0 (OCP MX, FP4 emax 2).
    amax = np.abs(x.reshape(2, 32, 3)).max(axis=1)
    np.testing.assert_array_equal(t["w:scales"], np.floor(np.log2(amax)).astype(int) - 2 + 127)
    # The low nibble of byte 0 is element 0's E2M1 bit pattern.
    y = np.asarray(formats.fake_quant_format(x, "mxfp4"))
    first = (y.reshape(-1)[0] / 2.0 ** (np.floor(np.log2(amax[0, 0])) - 2)).astype(
        ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert t["w:codes"][0] & 0xF == first


def test_wrong_file_raises(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"not a kure_jax\.format_weights"):
        format_export.load_format_weights(tmp_path / "x.safetensors")
