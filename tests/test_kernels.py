"""Tests of kure_jax.kernels: every Pallas kernel in interpret mode against its reference.

The kernels run through the core's ``impl="pallas"`` (``kure_jax.fake_quant``,
``kure_jax.quantize``, ``kure_jax.penalty``, ``kurtosis_many``, ``tensor_moments``). References:
the same functions with ``impl="jnp"`` (themselves tested against NumPy), NumPy float64 moments
(here and tests/_references.py), and ``jax.grad`` of the jnp ``kure_jax.penalty``.
Small blocks make every shape span several tiles with partial edge tiles. The Triton (CUDA) and
Mosaic (TPU) lowerings are checked with ``jax.export`` from CPU: that runs the Pallas lowering
(unsupported primitives, block-shape rules) but not the Triton/Mosaic compilers themselves.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from _references import np_kurtosis, np_kurtosis_grad
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kure_jax
from kure_jax import kernels, quant
from kure_jax.kernels import _config, _ops
from kure_jax.kurtosis import kurtosis_many, penalty_and_kurtosis, tensor_moments
from kure_jax.quant import ops as quant_ops
from kure_jax.quant.policy import QuantPolicy

HASH = {"noise": "hash"}  # The kernels' noise stream, on the jnp path too.

PALLAS = {"impl": "pallas", "interpret": True}
BLOCK = (4, 8)  # Tiny tiles: (13, 10) -> 4 x 2 tiles, the last ones partial.
_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


# Interpret-mode kernels are XLA while-loops; skipping most optimisations halves test time.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _normal(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _step(shape, seed=1):
    """Positive steps of ``shape`` around 0.3."""
    return 0.3 * jnp.exp(0.3 * jax.random.normal(jax.random.key(seed), shape))


def _export(fn, platform, *args):
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=_TRITON)(*args)


# ---------------------------------------------------------------------------------------------
# Element-wise building blocks.


@given(hnp.arrays(np.float32, 64, elements=st.floats(-1e6, 1e6, width=32)))
def test_round_half_even_matches_numpy(v):
    np.testing.assert_array_equal(np.asarray(_ops.round_half_even(jnp.asarray(v))), np.round(v))


def test_round_half_even_edge_cases():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, -2.0**-30,
                  8388607.5, -8388607.5, 2.0**24 + 2, 0.0], np.float32)
    np.testing.assert_array_equal(np.asarray(_ops.round_half_even(jnp.asarray(v))), np.round(v))


@pytest.mark.parametrize("rounding", ["nearest", "nearest_away", "floor"])
def test_round_values_match_core(rounding):
    v = jnp.concatenate([_normal((500,)) * 4, jnp.arange(-6, 6.5, 0.5)])
    np.testing.assert_array_equal(_ops.round_values(v, rounding, None),
                                  quant_ops.round_values(v, rounding))


def _uniforms(n, words=(123, 456)):
    bits = _ops.hash_bits(jnp.arange(n, dtype=jnp.uint32), jnp.uint32(words[0]),
                          jnp.uint32(words[1]))
    return np.asarray(bits), np.asarray(_ops.uniform_from_bits(bits), np.float64)


def test_hash_noise_is_uniform_and_uncorrelated():
    n = 1 << 16
    bits, u = _uniforms(n)
    assert len(np.unique(bits)) == n  # A bijection of the counter: no collisions.
    counts = np.bincount((u * 256).astype(int), minlength=256)
    assert scipy.stats.chisquare(counts).pvalue > 1e-4
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-4
    ones = ((bits[:, None] >> np.arange(32)) & 1).mean(axis=0)  # Every bit is a fair coin.
    np.testing.assert_allclose(ones, 0.5, atol=5 * 0.5 / np.sqrt(n))
    for lag in (1, 2, 1024):  # Neighbouring elements (same row, next row) are uncorrelated.
        assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 5 / np.sqrt(n)
    _, u_next_key = _uniforms(n, (124, 456))  # Adjacent keys give unrelated streams.
    assert abs(np.corrcoef(u, u_next_key)[0, 1]) < 5 / np.sqrt(n)
    assert 0.0 <= u.min() and u.max() < 1.0


# ---------------------------------------------------------------------------------------------
# fake_quant with a given step.

_GROUPINGS = {  # x shape -> step shape: per tensor, per trailing channel, per leading channel.
    "tensor": ((13, 10), ()),
    "col": ((3, 3, 5, 6), (1, 1, 1, 6)),
    "row": ((13, 10), (13, 1)),
    "col2": ((7, 3, 5), (1, 3, 5)),
}


@pytest.mark.parametrize(
    "grouping,dtype,rounding",
    [("tensor", jnp.float32, "nearest"), ("tensor", jnp.bfloat16, "nearest_away"),
     ("col", jnp.float32, "floor"), ("col", jnp.bfloat16, "nearest"),
     ("row", jnp.float32, "nearest"), ("row", jnp.float16, "nearest"),
     ("col2", jnp.float32, "nearest")],
)
def test_fake_quant_matches_core_bit_for_bit(grouping, dtype, rounding):
    shape, step_shape = _GROUPINGS[grouping]
    x, s = _normal(shape, dtype) * 1.5, _step(step_shape)
    ours = jax.jit(functools.partial(kure_jax.fake_quant, bits=3, rounding=rounding,
                                     block_shape=BLOCK, **PALLAS))(x, s)
    ref = quant.fake_quant(x, s, bits=3, rounding=rounding)
    assert ours.dtype == dtype and ours.shape == shape
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("grouping", ["tensor", "col", "row"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fake_quant_gradients_match_core(grouping, dtype):
    shape, step_shape = _GROUPINGS[grouping]
    x, s = _normal(shape, dtype) * 1.5, _step(step_shape)
    weights = _normal(shape, seed=5)  # Non-uniform cotangent.

    def loss(fq, x, s):
        return jnp.sum(fq(x, s).astype(jnp.float32) * weights)

    ours = functools.partial(kure_jax.fake_quant, bits=4, signed=grouping != "row",
                             lsq_grad_scale=True, block_shape=BLOCK, **PALLAS)
    ref = functools.partial(quant.fake_quant, bits=4, signed=grouping != "row",
                            lsq_grad_scale=True)
    g_ours = jax.jit(jax.grad(functools.partial(loss, ours), (0, 1)))(x, s)
    g_ref = jax.grad(functools.partial(loss, ref), (0, 1))(x, s)
    assert g_ours[0].dtype == dtype and g_ours[1].shape == s.shape
    np.testing.assert_array_equal(np.asarray(g_ours[0], np.float32),
                                  np.asarray(g_ref[0], np.float32))
    np.testing.assert_allclose(g_ours[1], g_ref[1], rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(g_ours[0]) == 0) and np.any(np.asarray(g_ours[0]) != 0)  # Clipped.


def test_fake_quant_vmaps_over_a_batch():
    xs, ss = _normal((3, 13, 10)), _step((3,))
    f = functools.partial(kure_jax.fake_quant, bits=4, block_shape=BLOCK, **PALLAS)
    batched = jax.jit(jax.vmap(f))(xs, ss)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], quant.fake_quant(xs[i], ss[i], bits=4))


# ---------------------------------------------------------------------------------------------
# Stochastic rounding: noise generated inside the kernel.


@pytest.mark.parametrize("grouping", ["tensor", "col"])
def test_stochastic_kernel_matches_jnp_path_and_ignores_block_shape(grouping):
    shape, step_shape = _GROUPINGS[grouping]
    x, s, key = _normal(shape), _step(step_shape), jax.random.key(7)
    f = lambda impl, block: kure_jax.fake_quant(x, s, bits=8, rounding="stochastic", key=key,
                                                impl=impl, interpret=True, block_shape=block,
                                                **HASH)
    ref = f("jnp", None)
    np.testing.assert_array_equal(f("pallas", BLOCK), ref)
    np.testing.assert_array_equal(f("pallas", (8, 4)), ref)
    # Each element is one of the two grid points around x / s.
    v = np.asarray(x / s, np.float64)
    q = np.asarray(ref / s, np.float64)
    assert np.all((np.abs(q - np.floor(v)) < 1e-4) | (np.abs(q - np.floor(v) - 1) < 1e-4))


def test_stochastic_rounding_is_unbiased_and_keyed():
    n, frac = 1 << 14, 0.3
    x = jnp.full((n // 128, 128), 2.0 + frac, jnp.float32)  # step 1: codes 2 or 3.
    f = jax.jit(lambda key: kure_jax.fake_quant(x, 1.0, bits=8, rounding="stochastic", key=key,
                                               block_shape=(16, 128), **PALLAS))
    y0, y1 = np.asarray(f(jax.random.key(0))), np.asarray(f(jax.random.key(1)))
    p = (y0 == 3.0).mean()
    assert np.all((y0 == 2.0) | (y0 == 3.0))
    assert abs(p - frac) < 5 * np.sqrt(frac * (1 - frac) / n)  # E[round(x)] = x.
    assert (y0 != y1).mean() > 0.3  # Another key, other draws (expected 2 p (1 - p) = 0.42).


def test_stochastic_gradient_is_straight_through():
    x = _normal((13, 10))
    g = jax.grad(lambda x: jnp.sum(kure_jax.fake_quant(
        x, 0.5, bits=8, rounding="stochastic", key=jax.random.key(0), block_shape=BLOCK,
        **PALLAS)))(x)
    np.testing.assert_array_equal(g, np.ones_like(g))


# ---------------------------------------------------------------------------------------------
# quantize with an absmax step (QuantPolicy clip="max").


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((13, 10), None, jnp.float32), ((3, 3, 5, 6), -1, jnp.bfloat16),
     ((3, 3, 5, 6), (2, 3), jnp.float32), ((13, 10), 0, jnp.float32),
     ((6, 5, 3), (0, 1), jnp.bfloat16)],
)
def test_absmax_kernel_matches_jnp_quantize(shape, axis, dtype):
    x, ratio = _normal(shape, dtype) * 2, jnp.float32(0.9)  # ratio < 1 makes some values clip.
    policy = QuantPolicy(bits=4, axis=axis)
    ours = lambda x, r: kure_jax.quantize(x, policy, step_ratio=r, block_shape=BLOCK, **PALLAS)
    ref = lambda x, r: kure_jax.quantize(x, policy, step_ratio=r)
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(x, ratio), np.float32),
                                  np.asarray(ref(x, ratio), np.float32))
    loss = lambda f: lambda x, r: jnp.sum(jnp.cos(f(x, r).astype(jnp.float32)))
    g_ours = jax.jit(jax.grad(loss(ours), (0, 1)))(x, ratio)
    g_ref = jax.grad(loss(ref), (0, 1))(x, ratio)
    np.testing.assert_array_equal(np.asarray(g_ours[0], np.float32),
                                  np.asarray(g_ref[0], np.float32))
    np.testing.assert_allclose(g_ours[1], g_ref[1], rtol=1e-5)


def test_middle_channel_axis_uses_jnp_under_auto_and_raises_under_pallas():
    x = _normal((4, 5, 6))
    policy = QuantPolicy(bits=4, axis=1)
    with pytest.raises(ValueError, match="middle axes"):
        kure_jax.quantize(x, policy, **PALLAS)
    np.testing.assert_array_equal(kure_jax.quantize(x, policy, impl="auto"),
                                  kure_jax.quantize(x, policy))
    with pytest.raises(ValueError, match="dtype int32"):
        kure_jax.fake_quant(jnp.ones((4, 4), jnp.int32), 1.0, bits=4, **PALLAS)


# ---------------------------------------------------------------------------------------------
# KURE moments, kurtosis and penalty.


def _params(offset=0.0):
    """Kernels of assorted sizes (several 64-element blocks, partial last blocks) and a bias.

    ``offset`` moves one tensor's mean far from 0 relative to its spread (std 0.29).
    """
    keys = jax.random.split(jax.random.key(3), 4)
    return {
        "stem": {"kernel": jax.random.normal(keys[0], (3, 3, 3, 5))},  # 135 = 2 x 64 + 7.
        "block": {"kernel": offset + jax.random.uniform(keys[1], (37, 11))},
        "head": {"kernel": jax.random.laplace(keys[2], (300, 7)).astype(jnp.bfloat16),
                 "bias": jnp.ones((7,))},
        "tiny": {"kernel": jax.random.normal(keys[3], (2, 3))},
    }


def _np_kurtosis(w, ddof):
    """Float64 kurtosis and its gradient (tests/_references.py)."""
    return np_kurtosis(w, ddof), np_kurtosis_grad(w, ddof)


def _assert_grads_close(got, want, rel):
    """Each leaf within ``rel`` of that leaf's largest gradient entry."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape
        b = np.asarray(b, np.float64)
        np.testing.assert_allclose(np.asarray(a, np.float64), b,
                                   atol=rel * (np.abs(b).max() or 1.0), rtol=0)


def test_tensor_moments_match_numpy_float64():
    leaves = [leaf for _, leaf in kure_jax.select(_params(offset=100.0))]
    got = jax.jit(lambda ts: tensor_moments(ts, block_size=64, **PALLAS))(leaves)
    for i, leaf in enumerate(leaves):
        w = np.asarray(leaf, np.float64).ravel()
        d = w - w.mean()
        sigma = d.std()
        np.testing.assert_allclose(got.mean[i], w.mean(), rtol=1e-6, atol=1e-6 * sigma)
        np.testing.assert_allclose(got.m2[i], np.mean(d**2), rtol=1e-5)
        np.testing.assert_allclose(got.m3[i], np.mean(d**3), atol=1e-5 * sigma**3)
        np.testing.assert_allclose(got.m4[i], np.mean(d**4), rtol=1e-5)
        np.testing.assert_allclose(got.absmax[i], np.abs(w).max(), rtol=0)


@pytest.mark.parametrize("ddof", [0, 1])
def test_kurtosis_many_matches_float64_with_gradient(ddof):
    # A mean 350x the spread: per-block centring after a per-tensor shift keeps 1e-6 accuracy.
    leaves = [leaf for _, leaf in kure_jax.select(_params(offset=100.0))]
    leaves.append(jnp.full((5, 4), 2.5))
    ours = jax.jit(lambda ts: kurtosis_many(ts, ddof=ddof, block_size=128, **PALLAS))
    want = [_np_kurtosis(t, ddof) for t in leaves[:-1]]
    np.testing.assert_allclose(ours(leaves)[:-1], [k for k, _ in want], rtol=2e-6)
    assert float(ours(leaves)[-1]) == 0.0  # Constant tensor: 0, as kure_jax.kurtosis.
    ct = jnp.arange(1.0, len(leaves) + 1)
    grads = jax.grad(lambda ts: jnp.dot(ours(ts), ct))(leaves)
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    float32 = [i for i, t in enumerate(leaves[:-1]) if t.dtype == jnp.float32]
    _assert_grads_close([grads[i] for i in float32], [ct[i] * want[i][1] for i in float32],
                        rel=1e-5)
    # bfloat16 leaves get bfloat16 gradients: 8 significant bits.
    _assert_grads_close(grads[1:2], [ct[1] * want[1][1]], rel=1e-2)
    assert not np.any(np.asarray(grads[-1]))  # Zero gradient for the constant tensor.


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e-5, 1e10, 1e30])
def test_kurtosis_many_is_scale_free(scale):
    # Raw fourth powers of weights with a std of 1e-10 (or 1e10) leave float32's range: the
    # kernels work in units of each tensor's own scale, so value and gradient stay exact.
    base = [np.asarray(leaf, np.float64) for _, leaf in kure_jax.select(_params(offset=3.0))
            if leaf.dtype == jnp.float32]
    leaves = [jnp.asarray(w * scale, jnp.float32) for w in base]
    ours = jax.jit(lambda ts: kurtosis_many(ts, block_size=64, **PALLAS))
    want = [_np_kurtosis(w, 0) for w in base]
    np.testing.assert_allclose(ours(leaves), [k for k, _ in want], rtol=2e-6)
    grads = jax.grad(lambda ts: jnp.sum(ours(ts)))(leaves)
    _assert_grads_close([g * scale for g in grads], [g for _, g in want], rel=1e-5)
    if 1e-10 <= scale <= 1e10:  # Raw moments themselves are float32 (m2 ~ scale^2).
        moments = tensor_moments(leaves[:1], block_size=64, **PALLAS)
        np.testing.assert_allclose(float(moments.m2[0]) / scale**2, np.var(base[0]), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_penalty_and_gradient_match_core(reduction):
    params = _params()
    ours = lambda p: kure_jax.penalty(p, reduction=reduction, ddof=1, block_size=128, **PALLAS)
    ref = lambda p: kure_jax.penalty(p, reduction=reduction, ddof=1)
    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    ref_value, ref_grads = jax.value_and_grad(ref)(params)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    # "block" has kurtosis 1.796, so its gradient 2 (K - 1.8) dK amplifies float32 error in K
    # (the core's included) 250-fold; test_penalty_gradient_matches_float64_formula is tighter.
    _assert_grads_close(grads, ref_grads, rel=1e-3)
    assert not np.any(np.asarray(grads["head"]["bias"]))  # Unselected leaves: zero gradient.


def test_penalty_gradient_matches_float64_formula():
    params = _params(offset=100.0)
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: kure_jax.penalty(p, block_size=128, **PALLAS)))(params)
    names = [name for name, _ in kure_jax.select(params)]
    want = {name: _np_kurtosis(leaf, 0) for name, leaf in kure_jax.select(params)}
    terms = [(k - kure_jax.UNIFORM_KURTOSIS) ** 2 for k, _ in want.values()]
    np.testing.assert_allclose(value, np.mean(terms), rtol=1e-5)
    for name in names:
        k, g = want[name]
        leaf_grad = grads
        for key in name.split("/"):
            leaf_grad = leaf_grad[key]
        expected = 2 * (k - kure_jax.UNIFORM_KURTOSIS) / len(names) * g
        rel = 1e-2 if leaf_grad.dtype == jnp.bfloat16 else 1e-4
        _assert_grads_close(leaf_grad, expected, rel=rel)


def test_penalty_selection_and_axis_fallback():
    params = _params()
    where = lambda path, leaf: path[0] in ("block", "tiny") and path[-1] == "kernel"
    np.testing.assert_allclose(kure_jax.penalty(params, where=where, block_size=128, **PALLAS),
                               kure_jax.penalty(params, where=where), rtol=2e-5)
    per_channel = kure_jax.penalty(params, axis=0)
    assert float(kure_jax.penalty(params, axis=0, impl="auto")) == float(per_channel)
    with pytest.raises(ValueError, match="per-tensor"):
        kure_jax.penalty(params, axis=0, **PALLAS)
    with pytest.raises(ValueError, match="reduction"):
        kure_jax.penalty(params, reduction="median", **PALLAS)
    with pytest.raises(ValueError):
        kure_jax.penalty({"b": jnp.ones(3)}, **PALLAS)  # Nothing selected.


# ---------------------------------------------------------------------------------------------
# Dispatch, lowering and errors.


def _uses_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_dispatch_defaults_to_jnp_on_cpu_and_follows_env(monkeypatch):
    x = _normal((13, 10))
    f = lambda impl: lambda x: kure_jax.fake_quant(x, 0.5, bits=4, impl=impl, interpret=True)
    monkeypatch.delenv(_config.ENV_VAR, raising=False)
    assert not _uses_pallas(f(None), x) and not _uses_pallas(f("auto"), x)
    assert _uses_pallas(f("pallas"), x)
    monkeypatch.setenv(_config.ENV_VAR, "pallas")
    assert _uses_pallas(f(None), x) and not _uses_pallas(f("jnp"), x)
    monkeypatch.setenv(_config.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="KURE_JAX_KERNELS"):
        f(None)(x)
    with pytest.raises(ValueError, match="impl must be one of"):
        f("cuda")(x)


@pytest.mark.parametrize("op", ["fake_quant", "quantize"])
@pytest.mark.parametrize(
    "dtype, rounding, kernel",
    [("bfloat16", "nearest", True), ("float16", "nearest", True), ("float32", "nearest", False),
     ("bfloat16", "stochastic", False)],
)
def test_auto_on_gpu_takes_the_kernel_where_it_was_measured_faster(monkeypatch, op, dtype,
                                                                   rounding, kernel):
    # BENCHMARKS.md (H200): the kernels win for 16-bit deterministic fake-quant only.
    monkeypatch.setattr(_config, "local_backend", lambda: "gpu")
    x = _normal((13, 10)).astype(dtype)
    key = jax.random.key(0)
    kw = {"bits": 4, "rounding": rounding, "key": key, "interpret": True}
    policy = QuantPolicy(bits=4, rounding=rounding)
    f = {"fake_quant": lambda impl: lambda x: kure_jax.fake_quant(x, 0.5, impl=impl, **kw),
         "quantize": lambda impl: lambda x: kure_jax.quantize(x, policy, key=key, impl=impl,
                                                              interpret=True)}[op]
    assert _uses_pallas(f("auto"), x) == kernel
    assert _uses_pallas(f("pallas"), x)  # Asked for by name: always the kernel.


@pytest.mark.parametrize("grouping", ["tensor", "col", "row"])
def test_fake_quant_lowers_for_cuda(grouping):
    shape, step_shape = (1000, 300), {"tensor": (), "col": (1, 300), "row": (1000, 1)}[grouping]

    def fn(x, s):
        f = lambda x, s: kure_jax.fake_quant(x, s, bits=4, rounding="stochastic",
                                            key=jax.random.key(0), impl="pallas",
                                            platform="gpu", interpret=False)
        policy = QuantPolicy(bits=4, axis=None if grouping == "tensor" else
                             (-1 if grouping == "col" else 0))
        amax = kure_jax.quantize(x, policy, impl="pallas", platform="gpu", interpret=False)
        return amax, jax.grad(lambda x, s: jnp.sum(f(x, s).astype(jnp.float32)), (0, 1))(x, s)

    exported = _export(fn, "cuda", jax.ShapeDtypeStruct(shape, jnp.bfloat16),
                       jax.ShapeDtypeStruct(step_shape, jnp.float32))
    assert exported.mlir_module().count("xla.gpu.triton") >= 3  # absmax, fwd, bwd kernels.


def test_penalty_lowers_for_cuda():
    shapes = [(7, 7, 3, 64), (3, 3, 64, 64), (512, 1000)]
    fn = lambda ts: jax.value_and_grad(lambda ts: kure_jax.penalty(
        list(ts), impl="pallas", platform="gpu", interpret=False))(ts)
    exported = _export(fn, "cuda", [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    assert exported.mlir_module().count("xla.gpu.triton") >= 2


@pytest.mark.parametrize("step_shape", [(), (1, 384)])
def test_fake_quant_lowers_for_tpu(step_shape):
    fn = lambda x, s: jax.grad(lambda x, s: jnp.sum(kure_jax.fake_quant(
        x, s, bits=4, impl="pallas", platform="tpu", interpret=False)), (0, 1))(x, s)
    exported = _export(fn, "tpu", jax.ShapeDtypeStruct((1000, 384), jnp.float32),
                       jax.ShapeDtypeStruct(step_shape, jnp.float32))
    assert "tpu_custom_call" in exported.mlir_module()


def test_tpu_variant_runs_in_interpret_mode():
    x, s = _normal((20, 300)), _step((1, 300))  # TPU tiles: (8, 128), edge tiles padded.
    out = kure_jax.fake_quant(x, s, bits=4, impl="pallas", platform="tpu", interpret=True,
                             block_shape=(8, 128))
    np.testing.assert_array_equal(out, quant.fake_quant(x, s, bits=4))
    leaves = [_normal((20, 60)), _normal((1100,), seed=2)]  # 1024-element blocks, 2 each.
    np.testing.assert_allclose(
        kurtosis_many(leaves, impl="pallas", platform="tpu", interpret=True,
                              block_size=1024),
        jnp.stack([kure_jax.kurtosis(t) for t in leaves]), rtol=2e-5)


def test_invalid_arguments_raise():
    x = _normal((13, 10))
    fq = functools.partial(kure_jax.fake_quant, x, 0.5, bits=4, **PALLAS)
    for bad, match in [({"block_shape": (3, 8)}, "powers of two"),
                       ({"block_shape": (4,)}, "pair"),
                       ({"platform": "cuda"}, "platform"),
                       ({"rounding": "stochastic"}, "key"),
                       ({"rounding": "up"}, "rounding")]:
        with pytest.raises(ValueError, match=match):
            fq(**bad)
    with pytest.raises(ValueError, match="multiple of 8"):
        kure_jax.fake_quant(x, 0.5, bits=4, impl="pallas", platform="tpu", block_shape=(4, 8))
    with pytest.raises(ValueError, match="> 0"):
        kure_jax.fake_quant(x, -0.5, bits=4, **PALLAS)
    with pytest.raises(ValueError, match="broadcast"):
        kure_jax.fake_quant(x, jnp.ones((3, 10)), bits=4, **PALLAS)
    with pytest.raises(ValueError, match="bits"):
        kure_jax.quantize(x, QuantPolicy(bits=1), **PALLAS)
    with pytest.raises(ValueError, match="step_ratio"):
        kure_jax.quantize(x, QuantPolicy(bits=4), step_ratio=-1.0, **PALLAS)
    with pytest.raises(ValueError, match="block_size"):
        tensor_moments([x], block_size=100, **PALLAS)
    with pytest.raises(ValueError, match="non-empty"):
        tensor_moments([], **PALLAS)
    with pytest.raises(ValueError, match="ddof"):
        kurtosis_many([jnp.ones(1)], ddof=1, **PALLAS)
    with pytest.raises(ValueError, match="ddof must be an int >= 0"):
        kurtosis_many([x], ddof=-1, **PALLAS)
    with pytest.raises(ValueError, match="finite and > 0"):
        kure_jax.fake_quant(x, np.inf, bits=4, **PALLAS)
    # A lone array would be taken as the sequence of its rows, a dict as its keys.
    for not_a_list in (x, {"a": x}):
        with pytest.raises(TypeError, match="list or tuple of arrays"):
            kurtosis_many(not_a_list, **PALLAS)
    np.testing.assert_allclose(kurtosis_many((x,), ddof=np.int64(1), **PALLAS),
                               kure_jax.kurtosis(x, ddof=1)[None], rtol=1e-6)


def test_quantize_kernel_refuses_policies_it_does_not_cover():
    x = _normal((13, 10))
    for policy in (QuantPolicy(clip="mse"), QuantPolicy(symmetric=False),
                   QuantPolicy(pow2_step=True), QuantPolicy(bias_correction=True)):
        with pytest.raises(ValueError, match="this policy"):
            kure_jax.quantize(x, policy, **PALLAS)
        auto = kure_jax.quantize(x.astype(jnp.bfloat16), policy, impl="auto")  # jnp there
        np.testing.assert_array_equal(auto, kure_jax.quantize(x.astype(jnp.bfloat16), policy))


# ---------------------------------------------------------------------------------------------
# One fake_quant, one penalty: every impl gives the jnp result.


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
def test_fake_quant_pallas_equals_jnp(rounding):
    x, s, key = _normal((13, 10)) * 1.5, _step((1, 10)), jax.random.key(3)
    f = lambda impl: jax.value_and_grad(lambda x, s: jnp.sum(kure_jax.fake_quant(
        x, s, bits=4, rounding=rounding, key=key, lsq_grad_scale=True, impl=impl,
        interpret=True, block_shape=BLOCK, **HASH) * x), (0, 1))(x, s)
    (v_pl, g_pl), (v_jnp, g_jnp) = f("pallas"), f("jnp")
    np.testing.assert_allclose(v_pl, v_jnp, rtol=1e-6)
    np.testing.assert_array_equal(g_pl[0], g_jnp[0])
    np.testing.assert_allclose(g_pl[1], g_jnp[1], rtol=1e-5, atol=1e-6)


def test_fake_quant_noise_and_zero_point_rules():
    x, key = _normal((13, 10)), jax.random.key(0)
    sr = functools.partial(kure_jax.fake_quant, x, 0.5, bits=4, rounding="stochastic", key=key)
    # Default noise: jax.random on the jnp path, the hash when the kernel is asked for.
    np.testing.assert_array_equal(sr(), sr(noise="random"))
    np.testing.assert_array_equal(sr(**PALLAS), sr(noise="hash"))
    assert np.any(np.asarray(sr()) != np.asarray(sr(noise="hash")))
    with pytest.raises(ValueError, match="noise='random'"):
        sr(noise="random", **PALLAS)
    with pytest.raises(ValueError, match="noise must be"):
        sr(noise="threefry")
    with pytest.raises(ValueError, match="zero point"):
        kure_jax.fake_quant(x, 0.5, bits=4, zero_point=1.0, **PALLAS)
    np.testing.assert_array_equal(  # A zero point other than 0 stays on jnp under "auto".
        kure_jax.fake_quant(x.astype(jnp.bfloat16), 0.5, bits=4, zero_point=1.0, impl="auto"),
        kure_jax.fake_quant(x.astype(jnp.bfloat16), 0.5, bits=4, zero_point=1.0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_penalty_equal_across_impls(reduction):
    params = _params()
    values = {impl: kure_jax.penalty(params, reduction=reduction, impl=impl, block_size=128,
                                     interpret=True) for impl in kernels.IMPLS}
    for impl, value in values.items():
        np.testing.assert_allclose(value, values["jnp"], rtol=2e-5, err_msg=impl)
    value, kurt = penalty_and_kurtosis(params, reduction=reduction, **PALLAS)
    np.testing.assert_allclose(value, values["jnp"], rtol=2e-5)
    np.testing.assert_allclose(kurt, kurtosis_many(
        [leaf for _, leaf in kure_jax.select(params)]), rtol=2e-6)
