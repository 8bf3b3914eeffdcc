"""Nested (Matryoshka) codes against a NumPy reference written here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import np_nested
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kure_jax.quant.nested import minmax_codes, nested_fake_quant, slice_codes


def _reference(w: np.ndarray, r: int, c: int, axis=None) -> np.ndarray:
    """MatQuant's S(q_c, r) read back with the c-bit scale, in float64 NumPy (per ``axis``)."""
    reduce = None if axis is None else tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return np_nested(w, r, c, reduce=reduce, dtype=np.float64)


@pytest.mark.parametrize("r, c", [(8, 8), (4, 8), (2, 8), (3, 6), (2, 4)])
@pytest.mark.parametrize("axis", [None, -1])
def test_matches_the_numpy_reference(r, c, axis):
    w = np.random.default_rng(r * 10 + c).normal(size=(3, 3, 4, 5)).astype(np.float32)
    got = jax.jit(lambda w: nested_fake_quant(w, bits=r, nest_bits=c, channel_axes=axis))(w)
    # float32 arithmetic vs the float64 reference: equal up to float32 rounding of one code.
    np.testing.assert_allclose(got, _reference(w, r, c, axis), rtol=0, atol=2e-6 * np.abs(w).max())
    levels = len(np.unique(np.asarray(got)[..., 0])) if axis is not None else len(np.unique(got))
    assert levels <= 2**r


@settings(max_examples=50, deadline=None)
@given(codes=hnp.arrays(np.int32, st.integers(1, 40), elements=st.integers(0, 255)),
       r=st.integers(2, 8))
def test_slice_codes_keeps_the_top_bits(codes, r):
    got = np.asarray(slice_codes(codes, bits=r, nest_bits=8))
    expected = np.clip(np.floor(codes / 2 ** (8 - r) + 0.5), 0, 2**r - 1) * 2 ** (8 - r)
    np.testing.assert_array_equal(got, expected)
    assert np.all(got % 2 ** (8 - r) == 0)
    if r == 8:
        np.testing.assert_array_equal(got, codes)


def test_minmax_codes_span_the_range():
    w = jnp.array([[-1.0, 0.0, 3.0], [2.0, 2.0, 2.0]])
    codes, scale, zero = minmax_codes(w, bits=8, channel_axes=0)
    np.testing.assert_array_equal(codes[0], [0, 64, 255])  # round(1 / (4 / 255)) = 64
    np.testing.assert_allclose(scale[0, 0], 4 / 255)
    # A constant row keeps its value exactly.
    np.testing.assert_allclose((codes[1] - zero[1]) * scale[1], w[1], rtol=1e-6)


def test_the_gradient_is_straight_through():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    g = jax.grad(lambda w: jnp.sum(nested_fake_quant(w, bits=2) * jnp.arange(4.0)))(w)
    np.testing.assert_array_equal(g, jnp.broadcast_to(jnp.arange(4.0), w.shape))


def test_errors():
    with pytest.raises(ValueError, match="nest_bits"):
        slice_codes(jnp.zeros(3), bits=8, nest_bits=4)
    with pytest.raises(ValueError, match="bits"):
        nested_fake_quant(jnp.zeros(3), bits=1)
    with pytest.raises(ValueError, match="out of range"):
        minmax_codes(jnp.zeros((2, 2)), bits=8, channel_axes=2)
