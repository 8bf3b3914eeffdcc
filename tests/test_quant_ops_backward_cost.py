"""What quant.fake_quant's backward pass keeps and computes (the cost side of its custom VJP):
x is its only full-size residual, in x's own dtype, and an unused step gradient is dead code.
The same for qat_ops.learned_clip_quant (float32 x)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax import quant
from kure_jax.quant import quantizers as qat_ops

SHAPE = (64, 32)


def residuals(fn, *args):
    """The arrays a VJP closes over (``jax.vjp``'s function is a pytree of its residuals)."""
    _, vjp_fn = jax.vjp(fn, *args)
    return jax.tree.leaves(vjp_fn)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_x_is_the_only_full_size_residual(dtype, rounding):
    x = jax.random.normal(jax.random.key(0), SHAPE, dtype)
    key = jax.random.key(1)
    fq = lambda x, s: quant.fake_quant(x, s, bits=4, rounding=rounding, key=key)
    full = [r for r in residuals(fq, x, jnp.float32(0.1)) if r.shape == SHAPE]
    # Stochastic rounding also keeps its float32 noise (no gradient, but needed to recompute).
    expected = [dtype] + ([jnp.float32] if rounding == "stochastic" else [])
    assert sorted(str(r.dtype) for r in full) == sorted(str(jnp.dtype(d)) for d in expected)
    assert any(r.dtype == dtype and np.array_equal(r, x) for r in full)


@pytest.mark.parametrize("signed", [True, False])
def test_learned_clip_keeps_only_x(signed):
    x = jax.random.normal(jax.random.key(0), SHAPE)
    fq = lambda x, a: qat_ops.learned_clip_quant(x, a, bits=3, signed=signed)
    full = [r for r in residuals(fq, x, jnp.full((1, SHAPE[1]), 1.3)) if r.shape == SHAPE]
    assert len(full) == 1 and np.array_equal(full[0], x)


def compiled_hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_unused_step_gradient_is_dead_code():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    g = jax.random.normal(jax.random.key(1), SHAPE)
    s = jnp.float32(0.1)
    fq = lambda x, s: quant.fake_quant(x, s, bits=4, zero_point=0.0)
    x_only = compiled_hlo(lambda x, g, s: jax.vjp(lambda x: fq(x, s), x)[1](g), x, g, s)
    both = compiled_hlo(lambda x, g, s: jax.vjp(fq, x, s)[1](g), x, g, s)
    assert " reduce(" not in x_only  # neither the step nor the zero-point gradient is computed
    assert " reduce(" in both  # the check above can fail: the step gradient is a reduction


@pytest.mark.parametrize("scale_shape", [(), (1, 32)])
def test_gradients_match_numpy(scale_shape):
    """The recomputing backward still gives the documented STE and LSQ gradients."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=SHAPE).astype(np.float32)
    g = rng.normal(size=SHAPE).astype(np.float32)
    s = (0.2 + 0.1 * rng.random(scale_shape)).astype(np.float32)
    z = np.float32(1.0)
    fq = jax.jit(lambda x, s, z: quant.fake_quant(x, s, bits=3, zero_point=z))
    dx, ds, dz = jax.vjp(fq, x, s, z)[1](g)
    v = x.astype(np.float64) / s
    inside = (v + z >= -4) & (v + z <= 3)
    q = np.clip(np.round(v) + z, -4, 3)
    axes = tuple(range(x.ndim)) if not scale_shape else (0,)
    np.testing.assert_array_equal(dx, np.where(inside, g, 0.0))
    ds_ref = np.sum(g * np.where(inside, (q - z) - v, q - z), axis=axes).reshape(scale_shape)
    np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dz, np.sum(np.where(inside, 0.0, -g * s)), rtol=1e-5, atol=1e-4)
