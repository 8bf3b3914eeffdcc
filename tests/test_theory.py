"""Tests for kure_jax.theory against SciPy quadrature, Monte Carlo and published numbers."""

import doctest
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, optimize, stats

from kure_jax import theory

SQRT3 = math.sqrt(3.0)

# Paper (Shkolnik et al., NeurIPS 2020, as quoted in PAPER.md): optimal-clip SNR in dB at unit
# variance, uniform vs normal. These published values are the reference.
PAPER_SNR_DB = {
    2: (14.0, 10.9),
    3: (19.1, 15.1),
    4: (24.6, 19.8),
    5: (30.4, 24.8),
    6: (36.3, 30.0),
    8: (48.2, 40.6),
}
# ACIQ (Banner et al., NeurIPS 2019) optimal clip for 2..8 bits: Gaussian alpha/sigma (as quoted
# in PAPER.md) and Laplace alpha/b, from their "clip noise + alpha^2 / (3 * 4^M)" model.
ACIQ_GAUSS_ALPHA = (1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92)
ACIQ_LAPLACE_ALPHA = (2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89)


def _frozen(distribution, std):
    """Independent SciPy parametrisation of the three zero-mean laws with standard deviation std."""
    if distribution == "uniform":
        return stats.uniform(loc=-SQRT3 * std, scale=2 * SQRT3 * std)
    if distribution == "normal":
        return stats.norm(scale=std)
    return stats.laplace(scale=std / math.sqrt(2.0))


def _reference_quantize(x, bits, step):
    """The paper's quantizer, literally: D round(x/D) inside [-tau, tau], else sign(x) tau."""
    tau = 2 ** (bits - 1) * step
    return np.where(np.abs(x) <= tau, step * np.round(x / step), np.sign(x) * tau)


def _quad_mse(distribution, bits, step, std):
    """MSE by adaptive quadrature over every quantization cell of the whole real line."""
    law = _frozen(distribution, std)
    half = 2 ** (bits - 1)
    edges = np.concatenate([[-np.inf], (np.arange(-half, half) + 0.5) * step, [np.inf]])
    support = SQRT3 * std if distribution == "uniform" else np.inf
    total = 0.0
    for level, lo, hi in zip(np.arange(-half, half + 1) * step, edges[:-1], edges[1:], strict=True):
        lo, hi = max(lo, -support), min(hi, support)
        if lo >= hi:
            continue
        # The Laplace density has a kink at 0, inside the (finite) zero cell.
        points = [0.0] if (distribution == "laplace" and lo < 0 < hi) else None
        value, _ = integrate.quad(
            lambda x, level=level: (x - level) ** 2 * law.pdf(x),
            lo,
            hi,
            points=points,
            epsabs=0,
            epsrel=1e-12,
        )
        total += value
    return total


@pytest.mark.parametrize("distribution", theory.DISTRIBUTIONS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("step_scale", [0.4, 1.0, 2.5])
def test_exact_mse_matches_quadrature(distribution, bits, step_scale):
    std = 1.7
    step = step_scale * std / 2 ** (bits - 1)
    got = theory.quantization_mse(distribution, bits=bits, step=step, std=std)
    np.testing.assert_allclose(got, _quad_mse(distribution, bits, step, std), rtol=1e-8)


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("clip_fraction", [0.5, 0.9, 1.0])
def test_uniform_mse_is_the_paper_formula(bits, clip_fraction):
    # PAPER.md: MSE(D) = (a - 2^(M-1) D)^3 / (3a) + 2^M D^3 / (24a) for X ~ U(-a, a), tau <= a.
    std = 0.3
    a = SQRT3 * std
    step = clip_fraction * a / 2 ** (bits - 1)
    paper = (a - 2 ** (bits - 1) * step) ** 3 / (3 * a) + 2**bits * step**3 / (24 * a)
    np.testing.assert_allclose(
        theory.quantization_mse("uniform", bits=bits, step=step, std=std), paper, rtol=1e-12
    )
    np.testing.assert_allclose(
        theory.approximate_mse("uniform", bits=bits, step=step, std=std), paper, rtol=1e-12
    )


@pytest.mark.parametrize("distribution", theory.DISTRIBUTIONS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("step_ratio", [0.7, 1.0])
def test_monte_carlo_agrees_with_exact(distribution, bits, step_ratio):
    std, n = 2.0, 1_000_000
    step = step_ratio * theory.optimal_step(distribution, bits=bits, std=std)
    exact = theory.quantization_mse(distribution, bits=bits, step=step, std=std)
    mc = theory.monte_carlo_mse(distribution, bits=bits, step=step, std=std, num_samples=n, seed=3)
    # Standard error of a mean of n squared errors, estimated from an independent sample
    # quantized by the literal reference quantizer. 5 sigma: a false alarm has p ~ 6e-7. Rare
    # clipped outliers dominate Var[e^2], so sigma is 0.1% (M = 2) to ~5% (M = 8,
    # Laplace) of the MSE.
    x = _frozen(distribution, std).rvs(size=n, random_state=np.random.default_rng(11))
    sq_err = (x - _reference_quantize(x, bits, step)) ** 2
    stderr = sq_err.std() / math.sqrt(n)
    assert abs(mc - exact) < 5 * stderr
    assert abs(sq_err.mean() - exact) < 5 * stderr
    assert stderr < 0.1 * exact


def test_printed_aciq_form_is_not_the_model_at_two_bits():
    # With w = 1 the in-range noise is overcounted at low bits: 6% above the exact MSE at M = 2,
    # far outside Monte Carlo error (stderr ~0.2% here), but the weighted form is within 0.5%.
    step = theory.optimal_step("normal", bits=2)
    exact = theory.quantization_mse("normal", bits=2, step=step)
    mc = theory.monte_carlo_mse("normal", bits=2, step=step, num_samples=400_000, seed=5)
    aciq = theory.approximate_mse("normal", bits=2, step=step, weight_in_range=False)
    weighted = theory.approximate_mse("normal", bits=2, step=step)
    assert aciq / mc - 1 > 0.05
    assert abs(weighted / exact - 1) < 0.005


def test_snr_table_matches_paper():
    table = theory.snr_table()
    assert sorted(table) == sorted(PAPER_SNR_DB)
    for bits, (uniform, normal) in PAPER_SNR_DB.items():
        assert abs(table[bits]["uniform"] - uniform) <= 0.3, bits
        assert abs(table[bits]["normal"] - normal) <= 0.3, bits
        # Closed form derived from the paper's formula at D* = 2a / (2^M + 1).
        np.testing.assert_allclose(table[bits]["uniform"], 20 * math.log10(2**bits + 1), rtol=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 12, 16])
def test_snr_ordering_uniform_normal_laplace(bits):
    table = theory.snr_table(bits=(bits,), distributions=theory.DISTRIBUTIONS)[bits]
    assert table["uniform"] > table["normal"] > table["laplace"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_optimal_uniform_step(bits):
    std = 0.05
    a = SQRT3 * std
    step = theory.optimal_step("uniform", bits=bits, std=std)
    # Stationary point of the paper's formula: a - 2^(M-1) D = D / 2.
    np.testing.assert_allclose(step, 2 * a / (2**bits + 1), rtol=1e-9)
    # PAPER.md: "the MSE-optimal step is about 2a / 2^M".
    assert abs(step / (2 * a / 2**bits) - 1) <= 2.0**-bits


@pytest.mark.parametrize("distribution", theory.DISTRIBUTIONS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_optimal_step_matches_scipy_minimiser(distribution, bits):
    std = 3.0
    step = theory.optimal_step(distribution, bits=bits, std=std)
    result = optimize.minimize_scalar(
        lambda s: theory.quantization_mse(distribution, bits=bits, step=s, std=std),
        bounds=(0.5 * step, 2 * step),
        method="bounded",
        options={"xatol": 1e-10 * step},
    )
    np.testing.assert_allclose(step, result.x, rtol=1e-4)
    best = theory.quantization_mse(distribution, bits=bits, step=step, std=std)
    assert best <= result.fun * (1 + 1e-10)  # Round-off of the cell sum is ~1e-12.


@pytest.mark.parametrize(
    ("distribution", "unit", "published"),
    [("normal", 1.0, ACIQ_GAUSS_ALPHA), ("laplace", 1 / math.sqrt(2), ACIQ_LAPLACE_ALPHA)],
)
def test_printed_aciq_form_reproduces_aciq_clips(distribution, unit, published):
    for bits, alpha in zip(range(2, 9), published, strict=True):
        result = optimize.minimize_scalar(
            lambda log_step, bits=bits: theory.approximate_mse(
                distribution, bits=bits, step=math.exp(log_step), weight_in_range=False
            ),
            bounds=(-10.0, 1.0),
            method="bounded",
            options={"xatol": 1e-10},
        )
        clip = 2 ** (bits - 1) * math.exp(result.x)
        assert abs(clip / unit - alpha) <= 0.01, (bits, clip / unit)


@pytest.mark.parametrize("distribution", theory.DISTRIBUTIONS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("step_ratio", [None, 0.8, 1.3])
def test_curvature_matches_finite_differences(distribution, bits, step_ratio):
    std = 0.7
    optimum = theory.optimal_step(distribution, bits=bits, std=std)
    step = optimum if step_ratio is None else step_ratio * optimum
    h = 1e-3 * step

    def mse(s):
        return theory.quantization_mse(distribution, bits=bits, step=s, std=std)

    finite_difference = (mse(step + h) - 2 * mse(step) + mse(step - h)) / h**2
    got = theory.mse_step_curvature(
        distribution, bits=bits, std=std, step=None if step_ratio is None else step
    )
    np.testing.assert_allclose(got, finite_difference, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_uniform_curvature_at_optimum(bits):
    # d^2/dD^2 of the paper's formula at a - 2^(M-1) D = D / 2 is 2^(M-1), whatever a is.
    for std in (0.1, 1.0, 10.0):
        np.testing.assert_allclose(
            theory.mse_step_curvature("uniform", bits=bits, std=std), 2 ** (bits - 1), rtol=1e-7
        )


@given(
    distribution=st.sampled_from(theory.DISTRIBUTIONS),
    bits=st.integers(2, 10),
    log_clip=st.floats(-3.0, 3.0),
    std=st.floats(1e-3, 1e3),
    ratio=st.floats(0.5, 2.0),
)
def test_mse_properties(distribution, bits, log_clip, std, ratio):
    step = std * math.exp(log_clip) / 2 ** (bits - 1)
    mse = theory.quantization_mse(distribution, bits=bits, step=step, std=std)
    # Zero is a level and clipping moves x towards it, so |x - Q(x)| <= |x|: MSE <= variance.
    assert 0 < mse <= std**2 * (1 + 1e-12)
    # MSE scales as std^2 at a fixed step / std.
    unit = theory.quantization_mse(distribution, bits=bits, step=step / std, std=1.0)
    np.testing.assert_allclose(mse, std**2 * unit, rtol=1e-10)
    # The optimal step is optimal.
    best = theory.snr_db(distribution, bits=bits, std=std)
    assert best >= theory.snr_db(distribution, bits=bits, step=ratio * step, std=std) - 1e-9


def test_docstring_examples():
    assert doctest.testmod(theory).failed == 0


@pytest.mark.parametrize(
    "fn", [theory.quantization_mse, theory.approximate_mse, theory.monte_carlo_mse]
)
def test_invalid_arguments(fn):
    with pytest.raises(ValueError, match=r"uniform.*normal.*laplace"):
        fn("gaussian", bits=4, step=0.1)
    for bits in (1, 17, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"bits must"):
            fn("normal", bits=bits, step=0.1)
    for step in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="step must"):
            fn("normal", bits=4, step=step)
    for std in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="std must"):
            fn("normal", bits=4, step=0.1, std=std)


def test_invalid_arguments_of_search_functions():
    with pytest.raises(ValueError, match=r"uniform.*normal.*laplace"):
        theory.optimal_step("cauchy", bits=4)
    with pytest.raises(ValueError, match="bits must"):
        theory.snr_table(bits=(2, 1))
    with pytest.raises(ValueError, match="std must"):
        theory.snr_db("normal", bits=4, std=-1.0)
    with pytest.raises(ValueError, match="step must"):
        theory.mse_step_curvature("normal", bits=4, step=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        theory.monte_carlo_mse("normal", bits=4, step=0.1, num_samples=0)
