"""kure_jax.theory's data-type MSE against Monte Carlo through the real quantizer.

The Monte Carlo draws generalised-Gaussian values (scipy.stats.gennorm, the uniform for
kurtosis 1.8), scales each block (or tensor) by 2^U, U uniform in [0, 1), as the theory averages
over the tensor's scale, and quantises with kure_jax.quant.formats.fake_quant_format.
"""

import math

import numpy as np
import pytest
from scipy import stats

from kure_jax import theory
from kure_jax.quant import formats


def _draw(kurtosis: float, shape: tuple[int, ...], rng) -> np.ndarray:
    b = theory.generalized_gaussian_shape(kurtosis)
    if math.isinf(b):
        return rng.uniform(-math.sqrt(3), math.sqrt(3), shape)
    return stats.gennorm.rvs(b, size=shape, random_state=rng) / math.sqrt(stats.gennorm.var(b))


@pytest.mark.parametrize("preset, kurtosis", [
    ("int4_block32", 3.0), ("mxfp4", 1.8), ("mxfp4", 4.0), ("nvfp4", 6.0), ("nf4", 2.4),
    ("mxfp8_e4m3", 3.0), ("mxfp6_e3m2", 2.0),
])
def test_block_formats_match_monte_carlo(preset, kurtosis):
    fmt = formats.get_format(preset)
    k, blocks = fmt.block_size, 4000
    rng = np.random.default_rng(0)
    x = _draw(kurtosis, (k, blocks), rng)
    scale = 2.0 ** rng.uniform(0, 1, (1, blocks))
    if fmt.scale == "nvfp4":  # One per-tensor scale per 50 blocks, each tensor its own 2^U.
        scale = np.repeat(2.0 ** rng.uniform(0, 1, (1, blocks // 50)), 50, axis=1)
        xs = (x * scale).astype(np.float32)
        y = np.concatenate([np.asarray(formats.fake_quant_format(xs[:, i:i + 50], fmt))
                            for i in range(0, blocks, 50)], axis=1)
    else:
        xs = (x * scale).astype(np.float32)
        y = np.asarray(formats.fake_quant_format(xs, fmt))
    per_block = np.mean((y - xs) ** 2 / scale**2, axis=0)
    mc, se = per_block.mean(), per_block.std() / math.sqrt(blocks)
    want = theory.format_mse(kurtosis, levels=formats.element_levels(fmt.element),
                             block_size=k, scale_rule=fmt.scale)
    assert abs(mc - want) <= 4 * se + 2e-3 * want, (mc, se, want)


def test_per_tensor_fp8_matches_monte_carlo():
    fmt, n, tensors = formats.get_format("fp8_e4m3"), 1024, 200
    rng = np.random.default_rng(1)
    x = _draw(3.0, (tensors, n), rng).astype(np.float32)
    per_tensor = [np.mean((np.asarray(formats.fake_quant_format(t, fmt)) - t) ** 2) for t in x]
    mc, se = np.mean(per_tensor), np.std(per_tensor) / math.sqrt(tensors)
    want = theory.format_mse(3.0, levels=formats.element_levels("fp8_e4m3"), block_size=n)
    assert abs(mc - want) <= 4 * se + 2e-3 * want, (mc, se, want)


@pytest.mark.parametrize("b", [0.8, 1.0, 1.5, 2.0, 3.0, 8.0])
def test_kurtosis_of_the_family_matches_scipy(b):
    kurt = float(stats.gennorm.stats(b, moments="k")) + 3.0  # scipy gives the excess.
    assert theory.generalized_gaussian_kurtosis(b) == pytest.approx(kurt, rel=1e-10)
    if 1.8 <= kurt <= 6.0:
        assert theory.generalized_gaussian_shape(kurt) == pytest.approx(b, rel=1e-8)


def test_limits_and_names():
    int4 = formats.element_levels("int4")
    # One value per block with its own absmax scale is exact.
    assert theory.format_mse("normal", levels=int4, block_size=1) < 1e-20
    assert theory.format_mse("laplace", levels=int4, block_size=32) == theory.format_mse(
        6.0, levels=int4, block_size=32)
    # A uniform tensor under a uniform grid with a per-block absmax: the error is below the
    # D^2/12 of a per-tensor grid of the same clip, and SNR = -10 log10(MSE).
    mse = theory.format_mse("uniform", levels=int4, block_size=32)
    assert mse < (math.sqrt(3) / 7) ** 2 / 12
    assert theory.format_snr_db("uniform", levels=int4, block_size=32) == pytest.approx(
        -10 * math.log10(mse))


def test_best_kurtosis_is_the_grid_minimum():
    nf4 = formats.element_levels("nf4")
    k_best, mse_best = theory.best_kurtosis(levels=nf4, block_size=64)
    for k in (1.8, 2.4, 3.0, 4.0, 6.0):
        assert mse_best <= theory.format_mse(k, levels=nf4, block_size=64) + 1e-12
    assert 1.8 <= k_best <= 6.0


@pytest.mark.parametrize("kwargs, match", [
    ({"kurtosis": 7.0}, "kurtosis"), ({"kurtosis": "cauchy"}, "kurtosis"),
    ({"kurtosis": 3.0, "scale_rule": "max"}, "scale_rule"),
    ({"kurtosis": 3.0, "block_size": 0}, "block_size"),
])
def test_invalid_arguments_raise(kwargs, match):
    kwargs = {"levels": formats.element_levels("int4"), "block_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        theory.format_mse(kwargs.pop("kurtosis"), **kwargs)
