"""Accelerator formats (kure_jax.quant.formats) against independent references.

Element rounding is compared bit for bit with ml_dtypes' casts (saturating: the reference casts
the clipped value, since ml_dtypes' float8_e4m3fn turns overflow into NaN and float8_e5m2 into
inf); the MX and NVFP4 scales with NumPy transcriptions of the rules written here; NF4 with
QLoRA's published table.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kure_jax.quant import formats

FLOAT_ELEMENTS = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
# OCP MX v1.0, Table "Format names and parameters": emax of each element type (INT8: 0, with
# elements in units of 2^-6).
SPEC_EMAX = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2}
MX_PRESETS = {"mxfp4": "fp4_e2m1", "mxfp6_e3m2": "fp6_e3m2", "mxfp6_e2m3": "fp6_e2m3",
              "mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2"}
# QLoRA (Dettmers et al. 2023), Appendix E, "NF4 data type" values, typed in from the paper.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _representable(dtype) -> np.ndarray:
    """Every finite value of an ml_dtypes float type (all codes), sorted, as float64."""
    codes = np.arange(2 ** ml_dtypes.finfo(dtype).bits, dtype=np.uint8)
    values = codes.view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


def _probe_points(dtype) -> np.ndarray:
    """Values, midpoints between neighbours and their float32 neighbours, overflow, tiny ones."""
    v = _representable(dtype)
    mids = (v[1:] + v[:-1]) / 2
    big = float(ml_dtypes.finfo(dtype).max)
    spacing = big - v[-2]
    points = np.concatenate([
        v, mids, np.nextafter(mids.astype(np.float32), np.inf),
        np.nextafter(mids.astype(np.float32), -np.inf),
        [big + spacing / 2, big + spacing, big * 1.5, 1e30, -1e30, np.inf, -np.inf],
        [float(ml_dtypes.finfo(dtype).smallest_subnormal) / 2, 1e-30, -1e-30, -0.0],
    ])
    return points.astype(np.float32)


def _saturating_cast(x: np.ndarray, dtype) -> np.ndarray:
    big = float(ml_dtypes.finfo(dtype).max)
    return np.clip(x, -big, big).astype(dtype).astype(np.float32)


@pytest.mark.parametrize("element", sorted(FLOAT_ELEMENTS))
def test_float_elements_equal_ml_dtypes_bit_for_bit(element):
    dtype = FLOAT_ELEMENTS[element]
    x = _probe_points(dtype)
    got = np.asarray(formats.round_element(x, element))
    want = _saturating_cast(x, dtype)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    assert formats.ELEMENTS[element].max == float(ml_dtypes.finfo(dtype).max)


@pytest.mark.parametrize("element", sorted(FLOAT_ELEMENTS))
def test_float_elements_in_bfloat16_equal_ml_dtypes(element):
    dtype = FLOAT_ELEMENTS[element]
    x = _probe_points(dtype).astype(jnp.bfloat16)
    got = formats.round_element(x, element)
    assert got.dtype == jnp.bfloat16
    want = _saturating_cast(x.astype(np.float32), dtype).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


def test_nan_stays_nan():
    out = formats.round_element(np.array([np.nan, 1.0], np.float32), "fp8_e4m3")
    assert np.isnan(out[0]) and out[1] == 1.0


@pytest.mark.parametrize("element", ["int4", "int8"])
def test_integer_elements_round_half_even_and_saturate(element):
    top = formats.ELEMENTS[element].max
    x = np.concatenate([np.arange(-top - 3, top + 3, 0.25), [0.5, 1.5, -2.5, 1e9]]).astype(
        np.float32)
    want = np.clip(np.round(x), -top, top)  # np.round: half to even.
    np.testing.assert_array_equal(formats.round_element(x, element), want)


def test_nf4_levels_equal_the_qlora_table():
    np.testing.assert_array_equal(np.float32(formats.NF4_LEVELS), np.float32(QLORA_NF4))
    levels = np.float32(QLORA_NF4)
    mids = (levels[1:] + levels[:-1]) / 2
    x = np.concatenate([levels, mids, np.nextafter(mids, np.float32(2)),
                        np.nextafter(mids, np.float32(-2)), [0.5 * (0.0 + 0.07958029955625534)],
                        np.linspace(-1.5, 1.5, 301, dtype=np.float32)])
    # Nearest level; np.argmin's first minimum gives the lower level on an exact tie.
    # Distances in float64 (exact for float32 values this close), so float32 rounding of a
    # midpoint cannot fake a tie.
    dist = np.abs(x[:, None].astype(np.float64) - levels[None, :].astype(np.float64))
    want = levels[np.argmin(dist, axis=1)]
    np.testing.assert_array_equal(formats.round_element(x, "nf4"), want)


def _blocks(x: np.ndarray, k: int) -> np.ndarray:
    """Rank-2 ``(n, c)`` -> blocks of ``k`` rows ``(nb, k, c)``, zero-padded (axis 0 = -2)."""
    pad = -x.shape[0] % k
    return np.pad(x, ((0, pad), (0, 0))).reshape(-1, k, x.shape[1])


def _spread_input(rng, n=70, c=5):
    """Blocks of very different magnitudes, one all-zero column and exact powers of two."""
    x = rng.standard_normal((n, c)) * np.exp2(rng.integers(-20, 20, size=(1, c)))
    x[:, 1] = 0.0
    x[3, 2] = 2.0 ** 5
    return x.astype(np.float32)


def _spec_mx(x: np.ndarray, element: str, k: int = 32) -> np.ndarray:
    """OCP MX v1.0, section 6.3: X = 2^(floor(log2(max_i |V_i|)) - emax_elem), clamped to E8M0;
    P_i = quantize_to_element(V_i / X) (saturating); result X * P_i."""
    blocks = _blocks(x.astype(np.float64), k)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        shared = np.where(amax > 0, np.floor(np.log2(amax)), -np.inf)
    if element == "int8":  # MXINT8: 1.6 fixed point elements, emax 0.
        exp = np.clip(shared - 0, -127, 127)
        scale = np.exp2(exp)
        p = np.clip(np.round(blocks / scale * 64), -127, 127) / 64
    else:
        exp = np.clip(shared - SPEC_EMAX[element], -127, 127)
        scale = np.exp2(exp)
        p = _saturating_cast((blocks / scale).astype(np.float32), FLOAT_ELEMENTS[element])
    # The scale is an E8M0 value.
    np.testing.assert_array_equal(scale.astype(ml_dtypes.float8_e8m0fnu).astype(np.float64),
                                  scale)
    return (p * scale).reshape(-1, x.shape[1])[: x.shape[0]].astype(np.float32), scale


@pytest.mark.parametrize("preset", [*sorted(MX_PRESETS), "mxint8"])
def test_mx_equals_a_transcription_of_the_spec(preset):
    element = MX_PRESETS.get(preset, "int8")
    x = _spread_input(np.random.default_rng(0))
    want, scale = _spec_mx(x, element)
    np.testing.assert_array_equal(formats.fake_quant_format(x, preset), want)
    enc = formats.encode(x, preset)
    offset = 6 if element == "int8" else 0  # int8 counts in units of 1 (emax 6), the spec 2^-6.
    # An all-zero block's 2^-127 is a float32 subnormal, which XLA:CPU flushes to 0.
    nonzero = scale[:, 0, :] > 2.0**-127
    np.testing.assert_array_equal((enc.scales * 2.0**offset)[nonzero], scale[:, 0, :][nonzero])
    assert not nonzero.all() and np.all(np.asarray(enc.scales)[~nonzero] <= 2.0**-127)


def test_nvfp4_equals_a_transcription_of_the_two_level_rule():
    x = _spread_input(np.random.default_rng(1))[:, 2:]
    x = np.concatenate([x, x[:, :1] * np.float32(2.0**-40)], axis=1)  # Underflowing blocks.
    # Reciprocals of the constants as the docstring's rule writes them.
    t = np.abs(x).max() * np.float32(1 / (6 * 448))
    blocks = _blocks(x, 16)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    block_scale = (amax * np.float32(1 / 6) / t).astype(ml_dtypes.float8_e4m3fn).astype(
        np.float32)
    s = block_scale * t
    with np.errstate(divide="ignore", invalid="ignore"):
        p = _saturating_cast(np.where(s > 0, blocks / s, 0).astype(np.float32),
                             ml_dtypes.float4_e2m1fn)
    want = (p * s).reshape(-1, x.shape[1])[: x.shape[0]]
    np.testing.assert_array_equal(formats.fake_quant_format(x, "nvfp4"), want)
    assert (block_scale == 0).any(), "the input should have blocks whose E4M3 scale underflows"


@pytest.mark.parametrize("preset, element, k", [("int4_block32", "int4", 32),
                                                 ("int4_block128", "int4", 128),
                                                 ("int8_block32", "int8", 32),
                                                 ("nf4", "nf4", 64)])
def test_absmax_blocks_pad_the_last_block(preset, element, k):
    x = np.random.default_rng(2).standard_normal((k + 7, 3)).astype(np.float32)
    blocks = _blocks(x, k)
    scale = np.abs(blocks).max(axis=1, keepdims=True) * np.float32(
        1 / formats.ELEMENTS[element].max)
    v = (blocks / scale).astype(np.float32)
    q = np.asarray(formats.round_element(v, element))
    want = (q * scale).reshape(-1, 3)[: x.shape[0]]
    np.testing.assert_array_equal(formats.fake_quant_format(x, preset), want)


def test_block_axis_of_conv_kernels_and_activations():
    x = np.random.default_rng(3).standard_normal((3, 3, 40, 4)).astype(np.float32)
    y = formats.fake_quant_format(x, "mxfp4")  # Blocks along the input channels (axis -2).
    for h in range(3):
        want, _ = _spec_mx(x[h, 1], "fp4_e2m1")
        np.testing.assert_array_equal(y[h, 1], want)
    act = formats.Format(element="fp4_e2m1", scale="mx", axis=-1)
    np.testing.assert_array_equal(formats.fake_quant_format(x[0, 0].T, act), y[0, 0].T)


def test_per_tensor_fp8_and_a_calibrated_amax():
    x = np.float32([0.1, -3.0, 2.0, 40.0])
    s = np.float32(40.0) * np.float32(1 / 448)
    want = _saturating_cast(x / s, ml_dtypes.float8_e4m3fn) * s
    np.testing.assert_array_equal(formats.fake_quant_format(x, "fp8_e4m3"), want)
    s = np.float32(4.0) * np.float32(1 / 448)  # A calibrated range: 40 saturates at 4.
    want = _saturating_cast(x / s, ml_dtypes.float8_e4m3fn) * s
    y = formats.fake_quant_format(x, "fp8_e4m3", amax=4.0)
    np.testing.assert_array_equal(y, want)
    assert float(y[3]) == 4.0


def test_per_channel_scales():
    x = np.random.default_rng(4).standard_normal((6, 3)).astype(np.float32)
    fmt = formats.Format(element="int4", granularity="channel", block_size=None)
    s = np.abs(x).max(axis=0) * np.float32(1 / 7)
    np.testing.assert_array_equal(formats.fake_quant_format(x, fmt),
                                  np.clip(np.round(x / s), -7, 7) * s)
    assert formats.encode(x, fmt).scales.shape == (3,)


def test_straight_through_gradient_is_one_inside_zero_where_saturated():
    # One MX block with amax 7.5: X = 2^(2 - 2) = 1, so 6.5 and 7.5 lie beyond FP4's 6.
    x = jnp.float32([0.3, -1.2, 6.0, -6.5, 7.5, 5.9] + [0.0] * 26)
    g = jax.grad(lambda v: jnp.sum(formats.fake_quant_format(v, "mxfp4") * 3.0))(x)
    want = np.full(32, 3.0, np.float32)
    want[[3, 4]] = 0.0
    np.testing.assert_array_equal(g, want)
    g = jax.grad(lambda v: jnp.sum(formats.fake_quant_format(v, "fp8_e4m3", amax=1.0)))(
        jnp.float32([0.5, -1.0, 1.01, -2.0]))
    np.testing.assert_array_equal(g, [1.0, 1.0, 0.0, 0.0])
    g = jax.grad(lambda v: jnp.sum(formats.fake_quant_format(v, "nf4")))(x)
    np.testing.assert_array_equal(g, np.ones(32))


def test_works_under_jit_vmap_and_keeps_dtypes():
    x = jax.random.normal(jax.random.key(0), (4, 64, 8))
    f = jax.jit(jax.vmap(lambda v: formats.fake_quant_format(v, "nvfp4")))
    # Each vmapped slice is its own tensor, with its own NVFP4 per-tensor scale.
    np.testing.assert_array_equal(f(x), [formats.fake_quant_format(v, "nvfp4") for v in x])
    for dtype in (jnp.bfloat16, jnp.float16):
        y = formats.fake_quant_format(x.astype(dtype), "mxfp6_e2m3")
        assert y.dtype == dtype


def _grid(fmt: formats.Format) -> np.ndarray:
    """All element values of ``fmt`` (non-negative half for symmetric grids), float64."""
    if fmt.element in FLOAT_ELEMENTS:
        return _representable(FLOAT_ELEMENTS[fmt.element])
    if fmt.element == "nf4":
        return np.float64(QLORA_NF4)
    top = formats.ELEMENTS[fmt.element].max
    return np.arange(-top, top + 1)


FORMAT_STRATEGY = st.one_of(
    st.sampled_from(sorted(formats.PRESETS)),
    st.builds(lambda e, k, r: formats.Format(element=e, block_size=k, scale=r),
              st.sampled_from(["fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "int4", "int8"]),
              st.sampled_from([1, 5, 16]), st.sampled_from(["absmax", "mx", "nvfp4"])),
)


@settings(max_examples=15)
@given(fmt=FORMAT_STRATEGY, rows=st.sampled_from([1, 7, 33]), cols=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16), log_scale=st.integers(-12, 12))
def test_properties_error_idempotence_monotonicity(fmt, rows, cols, seed, log_scale):
    fmt = formats.get_format(fmt)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 2.0**log_scale).astype(np.float32)
    enc = formats.encode(x, fmt)
    q = np.asarray(enc.elements, np.float64)
    y = np.asarray(formats.fake_quant_format(x, fmt))
    # Error at most half the local spacing of the grid around v = x / s (clipped to the range).
    s = np.asarray(formats._expand(enc.scales, fmt, x.shape) * enc.tensor_scale, np.float64)
    grid = _grid(fmt)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(s > 0, x / s, 0.0)
    v = np.clip(v, grid[0], grid[-1])
    hi_idx = np.clip(np.searchsorted(grid, v), 1, len(grid) - 1)
    half = (grid[hi_idx] - grid[hi_idx - 1]) / 2
    assert np.all(np.abs(q - v) <= half * (1 + 1e-6) + 1e-6 * np.abs(v))
    # Idempotence: exact for power-of-two scales; float scales move by float32 rounding.
    y2 = np.asarray(formats.fake_quant_format(y, fmt))
    if fmt.scale == "mx":
        np.testing.assert_array_equal(y2, y)
    else:
        np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6 * np.abs(x).max())
    # Monotonicity within a scale group: sort one group's values, the outputs stay sorted.
    xs = np.sort(x, axis=0) if fmt.granularity != "tensor" else np.sort(x.ravel()).reshape(
        x.shape)
    ys = np.asarray(formats.fake_quant_format(xs, fmt))
    if fmt.granularity == "block":  # Each block of a column is a group.
        for start in range(0, rows, fmt.block_size):
            assert np.all(np.diff(ys[start:start + fmt.block_size], axis=0) >= 0)
    else:
        assert np.all(np.diff(ys, axis=0) >= 0)


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "nf4", "fp8_e5m2", "int4_block32"])
def test_bfloat16_in_gives_the_float32_result_rounded(preset):
    x = jax.random.normal(jax.random.key(0), (40, 3), jnp.bfloat16)
    got = formats.fake_quant_format(x, preset)
    want = formats.fake_quant_format(x.astype(jnp.float32), preset).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(
        np.uint16))


@pytest.mark.parametrize("kwargs, match", [
    ({"element": "fp3"}, "element"),
    ({"element": "int4", "block_size": 0}, "block_size"),
    ({"element": "int4", "granularity": "tensor"}, "block_size must be None"),
    ({"element": "int4", "granularity": "tensor", "block_size": None, "axis": 0}, "axis"),
    ({"element": "fp4_e2m1", "granularity": "tensor", "block_size": None, "scale": "nvfp4"},
     "nvfp4"),
    ({"element": "nf4", "scale": "mx"}, "float or int element"),
    ({"element": "int4", "scale": "max"}, "scale"),
])
def test_invalid_formats_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        formats.Format(**kwargs)


def test_invalid_calls_raise():
    with pytest.raises(ValueError, match="mxfp5"):
        formats.get_format("mxfp5")
    with pytest.raises(ValueError, match="block axis"):
        formats.fake_quant_format(jnp.ones(()), "mxfp4")
    with pytest.raises(ValueError, match="per-tensor range"):
        formats.fake_quant_format(jnp.ones((4, 4)), "mxfp4", amax=1.0)
    with pytest.raises(ValueError, match="floating"):
        formats.fake_quant_format(jnp.ones((4, 4), jnp.int32), "nf4")
    with pytest.raises(ValueError, match="non-empty"):
        formats.fake_quant_format(jnp.ones((0, 4)), "nf4")


def test_names():
    assert formats.get_format("int4_block64").name == "int4_block64"
    custom = formats.Format(element="fp4_e2m1", block_size=8, scale="mx")
    assert custom.name == "fp4_e2m1 mx block8"
    assert formats.Format(element="fp4_e2m1", scale="mx", axis=-1).describe("a") == (
        "a mxfp4 axis=-1")


def test_quantize_and_quantize_params_take_formats():
    from kure_jax.quant.policy import quantize
    from kure_jax.quant.ptq import quantize_params

    rng = np.random.default_rng(5)
    params = {"conv": {"kernel": rng.standard_normal((3, 3, 40, 4)).astype(np.float32),
                       "bias": np.ones(4, np.float32)},
              "dense": {"kernel": rng.standard_normal((70, 10)).astype(np.float32)}}
    out = quantize_params(params, "nvfp4")
    for layer in ("conv", "dense"):
        np.testing.assert_array_equal(out[layer]["kernel"],
                                      formats.fake_quant_format(params[layer]["kernel"], "nvfp4"))
    assert out["conv"]["bias"] is params["conv"]["bias"]
    fmt = formats.Format(element="int4", block_size=16)
    np.testing.assert_array_equal(quantize(params["dense"]["kernel"], fmt),
                                  formats.fake_quant_format(params["dense"]["kernel"], fmt))
    with pytest.raises(ValueError, match="step_ratio"):
        quantize_params(params, "mxfp4", step_ratio=1.1)
    with pytest.raises(ValueError, match="step_ratio"):
        quantize(params["dense"]["kernel"], "mxfp4", step_ratio=1.1)
    with pytest.raises(ValueError, match="'t' of shape"):  # A scalar has no block axis.
        quantize_params({"t": np.float32(2.0)}, "mxfp4", where=lambda path, leaf: True)


def test_element_levels_are_every_representable_value():
    for element, dtype in FLOAT_ELEMENTS.items():
        np.testing.assert_array_equal(formats.element_levels(element), _representable(dtype))
    np.testing.assert_array_equal(formats.element_levels("int4"), np.arange(-7, 8))
    np.testing.assert_array_equal(formats.element_levels("nf4"), np.float32(QLORA_NF4))


def test_qat_takes_data_types_for_kernels_and_inputs():
    from kure_jax.qat.config import QATConfig
    from kure_jax.qat.layer import quantize_input, quantize_kernel

    qat = QATConfig(weight_bits=4, weight_quantizer="mxfp4", act_bits=8,
                    act_quantizer="mxfp8_e4m3")
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((3, 3, 40, 8)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 40)), jnp.float32)
    np.testing.assert_array_equal(quantize_kernel(qat, w, None),
                                  formats.fake_quant_format(w, "mxfp4"))
    act = formats.Format(element="fp8_e4m3", scale="mx", axis=-1)  # Blocks along features.
    np.testing.assert_array_equal(quantize_input(qat, x, None), formats.fake_quant_format(x, act))
    g = jax.grad(lambda v: jnp.sum(quantize_kernel(qat, v, None)))(w)
    np.testing.assert_array_equal(g, jax.grad(
        lambda v: jnp.sum(formats.fake_quant_format(v, "mxfp4")))(w))
    fp8 = QATConfig(weight_bits=None, act_bits=8, act_quantizer="fp8_e5m2")
    np.testing.assert_array_equal(quantize_input(fp8, x, None),
                                  formats.fake_quant_format(x, "fp8_e5m2"))
    assert not qat.has_learned_state
    with pytest.raises(ValueError, match="weight_bits=4"):
        QATConfig(weight_bits=8, weight_quantizer="nvfp4")
    with pytest.raises(ValueError, match="data type"):
        QATConfig(weight_quantizer="mxfp5")


def test_signed_zero_only_where_the_element_has_one():
    x = np.float32([-0.0, -1e-6, 0.0])
    for element in ("int4", "int8", "nf4"):
        assert not np.signbit(np.asarray(formats.round_element(x, element))).any()
    np.testing.assert_array_equal(np.signbit(formats.round_element(x, "fp8_e4m3")),
                                  [True, True, False])
