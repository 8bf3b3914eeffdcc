"""Integer export (kure_jax.deploy.export): codes + steps in safetensors, read back bit for bit."""

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

from kure_jax import QuantPolicy, quantize_params
from kure_jax.deploy import export as ex


@pytest.fixture(scope="module")
def params():
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "params": {
            "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 8))},
            # An odd element count (5 * 7) exercises the padded last nibble of int4 packing.
            "dense": {"kernel": jax.random.laplace(keys[1], (5, 7)) * 0.1,
                      "bias": jax.random.normal(keys[2], (7,))},
        },
        "batch_stats": {"norm": {"mean": jax.random.normal(keys[3], (8,))}},
    }


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        a.view(np.uint8), b.view(np.uint8))


POLICIES = [
    QuantPolicy(bits=8),
    QuantPolicy(bits=8, axis=-1),
    QuantPolicy(bits=8, axis=-1, symmetric=False),
    QuantPolicy(bits=8, signed=False),
    QuantPolicy(bits=4),
    QuantPolicy(bits=4, axis=-1),
    QuantPolicy(bits=4, axis=-1, symmetric=False, clip="mse"),
    QuantPolicy(bits=4, signed=False, symmetric=False),
    QuantPolicy(bits=3, axis=-1),
    QuantPolicy(bits=2, narrow_range=False),
    QuantPolicy(bits=6, axis=-1, pow2_step=True),
    QuantPolicy(bits=5, step_scale=0.8, rounding="nearest_away"),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_dequantized_file_equals_quantize_params_bit_for_bit(params, policy, tmp_path):
    path = tmp_path / "w.safetensors"
    summary = ex.export_integer_weights(params, policy, path)
    assert summary["tensors"] == 2 and summary["float_tensors"] == 2
    expected = quantize_params(params, policy)
    restored = ex.dequantize(path, params)
    for (p, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                              jax.tree_util.tree_leaves(restored), strict=True):
        assert _bits_equal(got, want), jax.tree_util.keystr(p)
    # Without a template the file alone rebuilds the whole tree, float leaves included.
    alone = ex.dequantize(path)
    assert _bits_equal(alone["params"]["conv"]["kernel"], expected["params"]["conv"]["kernel"])
    assert _bits_equal(alone["batch_stats"]["norm"]["mean"], params["batch_stats"]["norm"]["mean"])


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_codes_lie_in_the_policy_range_and_the_header_describes_them(params, policy, tmp_path):
    path = tmp_path / "w.safetensors"
    ex.export_integer_weights(params, policy, path)
    loaded = ex.load_integer_weights(path)
    narrow = policy.narrow_range and policy.symmetric and policy.signed
    qmin, qmax = ex.integer_range(policy.bits, policy.signed, narrow_range=narrow)
    entries = loaded.metadata["tensors"]
    assert set(entries) == {"params/conv/kernel", "params/dense/kernel"}
    for name, t in loaded.tensors.items():
        assert t.codes.dtype == (np.int8 if policy.signed else np.uint8)
        assert qmin <= t.codes.min() and t.codes.max() <= qmax
        e = entries[name]
        assert (e["bits"], e["signed"], e["qmin"], e["qmax"]) == (policy.bits, policy.signed,
                                                                  qmin, qmax)
        assert e["layout"] == ({True: "int", False: "uint"}[policy.signed]
                               + ("4_packed" if policy.bits == 4 else "8"))
        rank = len(e["shape"])
        assert e["axis"] == (None if policy.axis is None else [rank - 1])
        want_scale_shape = () if policy.axis is None else (1,) * (rank - 1) + (e["shape"][-1],)
        assert t.scale.shape == want_scale_shape and t.scale.dtype == np.float32
        assert t.zero_point.shape == want_scale_shape and t.zero_point.dtype == np.int32
        if policy.symmetric:
            assert not t.zero_point.any()
    assert loaded.metadata["policy"] == policy.name


def _reference_pack(codes):
    """Independent NumPy packer: byte i = (c[2i] mod 16) + 16 * (c[2i + 1] mod 16)."""
    flat = [int(c) % 16 for c in np.asarray(codes).reshape(-1)]
    if len(flat) % 2:
        flat.append(0)
    return np.array([lo + 16 * hi for lo, hi in zip(flat[0::2], flat[1::2], strict=True)],
                    np.uint8)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_int4_packing_matches_a_numpy_packer_and_unpacks(signed, size):
    rng = np.random.default_rng(size)
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = rng.integers(lo, hi + 1, size=size).astype(np.int8 if signed else np.uint8)
    packed = ex.pack_int4(codes)
    np.testing.assert_array_equal(packed, _reference_pack(codes))
    back = ex.unpack_int4(packed, (size,), signed=signed)
    assert back.dtype == codes.dtype
    np.testing.assert_array_equal(back, codes)


def test_int4_file_stores_two_codes_per_byte(params, tmp_path):
    path = tmp_path / "w4.safetensors"
    ex.export_integer_weights(params, QuantPolicy(bits=4, axis=-1), path)
    with safe_open(str(path), framework="np") as f:
        stored = f.get_tensor("params/dense/kernel:codes")
        header = json.loads(f.metadata()["tensors"])["params/dense/kernel"]
    assert stored.dtype == np.uint8 and stored.shape == (18,)  # ceil(35 / 2)
    codes = ex.integer_codes(params["params"]["dense"]["kernel"], QuantPolicy(bits=4, axis=-1))
    np.testing.assert_array_equal(stored, _reference_pack(codes.codes))
    assert header["layout"] == "int4_packed" and header["shape"] == [5, 7]


def test_summary_counts_bytes_and_compression(params, tmp_path):
    s = ex.export_integer_weights(params, QuantPolicy(bits=8, axis=-1), tmp_path / "w.st",
                                  include_unselected=False)
    n_conv, n_dense = 3 * 3 * 4 * 8, 5 * 7
    assert s["float32_bytes"] == 4 * (n_conv + n_dense)
    # codes 1 byte each + per-channel float32 step and int32 zero point.
    assert s["quantized_bytes"] == n_conv + n_dense + 8 * (8 + 7)
    assert s["compression"] == pytest.approx(s["float32_bytes"] / s["quantized_bytes"])
    assert s["float_tensors"] == 0


@pytest.mark.parametrize("policy, match", [
    (QuantPolicy(bits=12), "bits=12 does not fit"),
    (QuantPolicy(bits=8, rounding="stochastic"), "deterministic"),
    (QuantPolicy(bits=8, bias_correction=True), "bias_correction"),
])
def test_policies_the_format_cannot_hold_are_refused(params, policy, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ex.export_integer_weights(params, policy, tmp_path / "w.st")


def test_explicit_leaves_must_exist_and_be_selected(params, tmp_path):
    with pytest.raises(ValueError, match="is not selected"):
        ex.export_integer_weights(params, QuantPolicy(bits=8), tmp_path / "w.st",
                                  leaves=["params/dense/bias"])
    with pytest.raises(ValueError, match="no leaf 'params/nope'"):
        ex.export_integer_weights(params, QuantPolicy(bits=8), tmp_path / "w.st",
                                  leaves=["params/nope"])
    s = ex.export_integer_weights(params, QuantPolicy(bits=8), tmp_path / "w.st",
                                  leaves=["params/dense/kernel"])
    assert s["tensors"] == 1
    assert set(ex.load_integer_weights(tmp_path / "w.st").tensors) == {"params/dense/kernel"}


def test_reading_a_missing_or_foreign_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        ex.load_integer_weights(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.st"))
    with pytest.raises(ValueError, match=r"is not a kure_jax\.integer_weights"):
        ex.load_integer_weights(tmp_path / "other.st")


def test_cli_writes_the_file_and_reports_it(params, tmp_path, monkeypatch, capsys):
    from kure_jax.training import checkpoint

    variables = {"params": params["params"], "batch_stats": params["batch_stats"]}
    monkeypatch.setattr(checkpoint, "restore_for_eval",
                        lambda path, which: (None, None, variables))
    out = tmp_path / "w4.safetensors"
    assert ex.main(["--checkpoint", str(tmp_path), "--bits", "4", "--axis", "-1",
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 integer tensors (w4 per-channel(-1) sym max nearest)" in printed
    assert "2 float tensors" in printed and "x smaller" in printed
    restored = ex.dequantize(out, params)
    want = quantize_params(params, QuantPolicy(bits=4, axis=-1))
    assert _bits_equal(restored["params"]["conv"]["kernel"], want["params"]["conv"]["kernel"])


@pytest.mark.parametrize("argv, match", [
    (["--bits", "12"], "bits=12 does not fit"),
    (["--bits", "8", "--leaf", "params/dense/bias"], "is not selected"),
    (["--bits", "8"], "No checkpoint under"),
])
def test_cli_errors_are_one_line_with_exit_status_2(argv, match, tmp_path, capsys, params,
                                                     monkeypatch):
    if "--leaf" in argv:
        from kure_jax.training import checkpoint

        monkeypatch.setattr(checkpoint, "restore_for_eval",
                            lambda path, which: (None, None, {"params": params["params"]}))
    checkpoint_dir = tmp_path if "--leaf" in argv else tmp_path / "absent"
    code = ex.main(["--checkpoint", str(checkpoint_dir), "--out", str(tmp_path / "w"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1
