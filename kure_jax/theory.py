"""Analytic quantization theory behind KURE: MSE, SNR and step-size sensitivity.

Reproduces the paper's argument that a uniformly distributed tensor quantizes with a higher SNR
than a normal (or Laplace) one. Plain NumPy/SciPy analysis code, not meant for ``jax.jit``.

Quantizer model (the paper's): ``M`` bits, step ``D``, clip ``tau = 2^(M-1) D``::

    Q(x) = D * clip(round(x / D), -2^(M-1), 2^(M-1))

i.e. levels ``k D`` for ``|k| <= 2^(M-1)``: ``2^M + 1`` levels (one more than an M-bit code
holds), symmetric around zero. Only this model reproduces the paper's table of optimal-clip SNRs
at unit variance (dB)::

    M                  2      3      4      5      6      8
    paper  uniform   14.0   19.1   24.6   30.4   36.3   48.2
    exact  uniform  13.98  19.08  24.61  30.37  36.26  48.21   (= 20 log10(2^M + 1))
    paper  normal    10.9   15.1   19.8   24.8   30.0   40.6
    exact  normal   10.85  15.13  19.83  24.80  29.95  40.60

Every entry matches within 0.05 dB. The ``2^M``-level readings fall short: midrise levels
``(k + 1/2) D`` give 12.04 / 9.25 dB (uniform / normal) at M = 2, and midtread levels
``k D``, ``-2^(M-1) <= k < 2^(M-1)``, give 8.26 dB for the normal at M = 2.

Two MSE formulas are offered:

* :func:`quantization_mse` is exact for the model: a finite sum of closed-form cell integrals
  (``normal``: ``Phi``/``phi`` terms; ``laplace``: exponentials; ``uniform``: cubics). For
  ``uniform`` with ``tau <= a`` it equals the paper's formula
  ``(a - tau)^3 / (3a) + 2^M D^3 / (24a)`` (``a = sqrt(3) std``). Monte Carlo agrees with it to
  within sampling error.
* :func:`approximate_mse` is the paper's/ACIQ's "clipping noise + ``D^2/12`` in-range noise"::

      MSE ~ 2 E[(X - tau)^2; X > tau] + (D^2 / 12) * w,   w = P(|X| <= tau) or 1

  For ``normal`` with ``w = 1`` this is the ACIQ form quoted in the paper,
  ``(tau^2 + s^2)(1 - erf(tau / (sqrt2 s))) - sqrt(2/pi) tau s exp(-tau^2 / (2 s^2)) + D^2/12``.
  For ``laplace`` (scale ``b = std / sqrt2``) the clipping term is
  ``2 int_tau^inf (x - tau)^2 exp(-x/b) / (2b) dx = 2 b^2 exp(-tau / b)``, so
  ``MSE ~ 2 b^2 exp(-tau/b) + (D^2/12) w``. With ``w = P(|X| <= tau)`` (the default, as in the
  paper's uniform formula) the optimal-clip normal SNRs are 10.87 / 15.13 / 19.83 dB at
  M = 2 / 3 / 4; with ``w = 1`` (ACIQ exactly as printed) they are 10.60 / 15.03 / 19.79 dB, so
  the printed ACIQ form misses the paper's 10.9 dB at M = 2 by 0.30 dB. The table is therefore
  the exact (or weighted) model, not the ``w = 1`` approximation.

Accuracy: the exact form is a sum of ``2^(M-1) + 1`` differences of O(1) terms; measured against
per-cell Gauss-Legendre quadrature its relative error is < 1e-12 up to 8 bits and about 1e-7
(normal) / 2e-6 (Laplace) at 16 bits; the uniform cells are centred and exact to round-off.

Sensitivity: :func:`mse_step_curvature` is ``d^2 MSE / dD^2`` (exact, by Leibniz' rule). It is
scale-free; at the optimum it is ``2^(M-1)`` for ``uniform`` versus 0.91 / 1.52 / 3.02 for
``normal`` at M = 2 / 4 / 8 (Laplace 0.56 / 0.98 / 1.82). Also relative to ``MSE* / D*^2`` the
uniform curvature is the larger (24 vs 7.9 at M = 2), so in this model the optimal uniform MSE
is *not* flatter in the step; the paper's SNR advantage holds, its curvature claim is not
reproduced here (as PAPER.md warns).

References:
  M. Shkolnik et al., "Robust Quantization: One Model to Rule Them All", NeurIPS 2020.
  R. Banner et al., "Post training 4-bit quantization of convolutional networks for
  rapid-deployment" (ACIQ), NeurIPS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import optimize, special

DISTRIBUTIONS = ("uniform", "normal", "laplace")
MIN_BITS = 2
MAX_BITS = 16

_Cells = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]


class _Density(NamedTuple):
    """A zero-mean, unit-variance symmetric density, used on ``x >= 0`` only.

    ``cells(lo, hi, c)`` returns ``int_lo^hi (x - c)^j p(x) dx`` for ``j = 0, 1, 2``
    (elementwise; ``hi`` may be ``inf``).
    """

    pdf: Callable[[np.ndarray], np.ndarray]
    cells: _Cells


_A = math.sqrt(3.0)  # U(-a, a) has unit variance.
_B = 1.0 / math.sqrt(2.0)  # Laplace(0, b) has unit variance.
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _uniform_cells(lo: np.ndarray, hi: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    # Antiderivatives centred on c: no cancellation between O(1) terms for narrow cells.
    u_lo, u_hi = np.minimum(lo, _A) - c, np.minimum(hi, _A) - c
    return tuple((u_hi ** (j + 1) - u_lo ** (j + 1)) / ((j + 1) * 2 * _A) for j in range(3))


def _tail_cells(tails: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]) -> _Cells:
    """Cell integrals from upper-tail integrals ``int_x^inf (t - c)^j p(t) dt`` (finite x)."""

    def cells(lo: np.ndarray, hi: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
        finite = np.isfinite(hi)
        upper = tails(np.where(finite, hi, 0.0), c)
        return tuple(a - np.where(finite, b, 0.0) for a, b in zip(tails(lo, c), upper, strict=True))

    return cells


def _normal_tails(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    # Survival-function forms keep far tails accurate.
    q, phi = special.ndtr(-x), _INV_SQRT_2PI * np.exp(-0.5 * x * x)
    return q, phi - c * q, (1 + c * c) * q + (x - 2 * c) * phi


def _laplace_tails(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    e, u = 0.5 * np.exp(-x / _B), x - c
    return e, e * (u + _B), e * (u * u + 2 * _B * u + 2 * _B**2)


_UNIFORM = _Density(pdf=lambda x: np.where(x < _A, 0.5 / _A, 0.0), cells=_uniform_cells)
_NORMAL = _Density(
    pdf=lambda x: _INV_SQRT_2PI * np.exp(-0.5 * x * x), cells=_tail_cells(_normal_tails)
)
_LAPLACE = _Density(pdf=lambda x: np.exp(-x / _B) / (2 * _B), cells=_tail_cells(_laplace_tails))


class _Moments(NamedTuple):
    mse: float
    d1: float  # d MSE / dD
    d2: float  # d^2 MSE / dD^2


def _density(distribution: str) -> _Density:
    table = {"uniform": _UNIFORM, "normal": _NORMAL, "laplace": _LAPLACE}
    if not isinstance(distribution, str) or distribution not in table:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    return table[distribution]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}.")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}.")
    return int(bits)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool | str):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return value


def _moments(density: _Density, bits: int, step: float) -> _Moments:
    """MSE and its first two step derivatives at unit variance (``step`` in units of std).

    By symmetry MSE is twice the ``x >= 0`` half. Cell ``k`` (level ``c_k = k D``) spans
    ``[lo_k, hi_k)`` with ``lo_0 = 0``, ``lo_k = (k - 1/2) D``, ``hi_k = (k + 1/2) D`` and
    ``hi_K = inf`` for ``K = 2^(M-1)`` (clipped values map to ``K D``). Differentiating under
    the integral (the boundary terms of neighbouring cells cancel)::

        MSE'  = -4 sum_k k int_cell (x - c_k) p
        MSE'' =  2 sum_{k>=1} [2 k^2 P_k - k D ((k + 1/2) p(hi_k) + (k - 1/2) p(lo_k))]
    """
    half = 2 ** (bits - 1)
    k = np.arange(half + 1, dtype=np.float64)
    centers = k * step
    lo = np.concatenate([[0.0], (k[1:] - 0.5) * step])
    hi = np.append((k[:-1] + 0.5) * step, np.inf)  # Values above the clip map to the top level.
    mass, m1, m2 = density.cells(lo, hi, centers)
    p_hi, p_lo = np.append(density.pdf(hi[:-1]), 0.0), density.pdf(lo)
    d2 = 2 * np.sum(2 * k**2 * mass - k * step * ((k + 0.5) * p_hi + (k - 0.5) * p_lo))
    return _Moments(mse=float(2 * np.sum(m2)), d1=float(-4 * np.sum(k * m1)), d2=float(d2))


def quantization_mse(distribution: str, *, bits: int, step: float, std: float = 1.0) -> float:
    """Exact MSE ``E[(X - Q(X))^2]`` of the paper's quantizer for a zero-mean tensor.

    Args:
      distribution: One of :data:`DISTRIBUTIONS`.
      bits: Bit-width ``M`` in ``[2, 16]``; the quantizer has ``2^M + 1`` levels ``k * step``.
      step: Step size ``D > 0`` (same units as ``std``); the clip is ``2^(M-1) * step``.
      std: Standard deviation of ``X`` (> 0).

    Returns:
      The MSE as a Python float: ``std^2 * MSE(step / std)`` at unit variance.

    Raises:
      ValueError: For an unknown distribution, bits outside ``[2, 16]`` or a non-positive
        (or non-finite) step or std.

    >>> round(quantization_mse("uniform", bits=2, step=2 * 3**0.5 / 5), 6)  # a^2 / 75
    0.04
    """
    density = _density(distribution)
    bits = _check_bits(bits)
    step, std = _check_positive("step", step), _check_positive("std", std)
    return std**2 * _moments(density, bits, step / std).mse


def approximate_mse(
    distribution: str,
    *,
    bits: int,
    step: float,
    std: float = 1.0,
    weight_in_range: bool = True,
) -> float:
    """The paper's/ACIQ's approximate MSE: clipping noise plus ``D^2/12`` in-range noise.

    .. math::

        \\mathrm{MSE} \\approx 2\\,E[(X - \\tau)^2; X > \\tau] + \\frac{D^2}{12}\\, w,
        \\qquad \\tau = 2^{M-1} D,

    with ``w = P(|X| <= tau)`` if ``weight_in_range`` else ``w = 1`` (ACIQ as printed). The
    clipping term is exact; closed forms are listed in the module docstring.

    Args:
      distribution: One of :data:`DISTRIBUTIONS`.
      bits: Bit-width ``M`` in ``[2, 16]``.
      step: Step size ``D > 0``.
      std: Standard deviation of ``X`` (> 0).
      weight_in_range: Weight the ``D^2/12`` term by the in-range probability.

    Returns:
      The approximate MSE as a Python float.

    Raises:
      ValueError: As :func:`quantization_mse`.
    """
    density = _density(distribution)
    bits = _check_bits(bits)
    step, std = _check_positive("step", step), _check_positive("std", std)
    unit_step = step / std
    tau = np.array([2 ** (bits - 1) * unit_step])
    tail_mass, _, tail_m2 = density.cells(tau, np.array([np.inf]), tau)
    clipping = 2 * float(tail_m2[0])
    weight = 1 - 2 * float(tail_mass[0]) if weight_in_range else 1.0
    return std**2 * (clipping + unit_step**2 / 12 * weight)


def monte_carlo_mse(
    distribution: str,
    *,
    bits: int,
    step: float,
    std: float = 1.0,
    num_samples: int = 1_000_000,
    seed: int = 0,
) -> float:
    """Monte Carlo MSE: quantizes ``num_samples`` seeded draws with the paper's quantizer.

    Samples come from ``np.random.default_rng(seed)`` in chunks of ``2^20`` (bounded memory).

    Args:
      distribution: One of :data:`DISTRIBUTIONS`.
      bits: Bit-width ``M`` in ``[2, 16]``.
      step: Step size ``D > 0``.
      std: Standard deviation of ``X`` (> 0).
      num_samples: Number of samples (>= 1).
      seed: Seed of the NumPy generator.

    Returns:
      The sample mean of ``(x - Q(x))^2``, a Python float.

    Raises:
      ValueError: As :func:`quantization_mse`, or for ``num_samples < 1``.
    """
    _density(distribution)
    bits = _check_bits(bits)
    step, std = _check_positive("step", step), _check_positive("std", std)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    rng = np.random.default_rng(seed)
    half = 2 ** (bits - 1)
    total, remaining = 0.0, num_samples
    while remaining:
        n = min(remaining, 1 << 20)
        if distribution == "uniform":
            x = rng.uniform(-_A * std, _A * std, n)
        elif distribution == "normal":
            x = rng.normal(0.0, std, n)
        else:
            x = rng.laplace(0.0, _B * std, n)
        q = step * np.clip(np.round(x / step), -half, half)
        total += float(np.sum((x - q) ** 2))
        remaining -= n
    return total / num_samples


def _optimal_unit_step(density: _Density, bits: int) -> float:
    # Coarse log-grid over the clip (0.25..64 std covers every optimum for M <= 16), then the
    # root of the exact derivative between the grid neighbours of the best point.
    half = 2 ** (bits - 1)
    steps = np.geomspace(0.25, 64.0, 41) / half
    values = [_moments(density, bits, s).mse for s in steps]
    i = int(np.argmin(values))
    if i in (0, len(steps) - 1):
        raise RuntimeError("MSE-optimal clip is outside the searched range [0.25, 64] std.")
    lo, hi = float(steps[i - 1]), float(steps[i + 1])

    def slope(s: float) -> float:
        return _moments(density, bits, s).d1

    if slope(lo) < 0 < slope(hi):
        return float(optimize.brentq(slope, lo, hi, xtol=1e-14 * lo, rtol=1e-14))
    result = optimize.minimize_scalar(
        lambda s: _moments(density, bits, s).mse, bounds=(lo, hi), method="bounded"
    )
    return float(result.x)


def optimal_step(distribution: str, *, bits: int, std: float = 1.0) -> float:
    """MSE-optimal step of :func:`quantization_mse`; the optimal clip is ``2^(M-1)`` times it.

    For ``uniform`` the optimum is ``2a / (2^M + 1)`` (``a = sqrt(3) std``), i.e. "about
    ``2a / 2^M``" as the paper says.

    Args:
      distribution: One of :data:`DISTRIBUTIONS`.
      bits: Bit-width ``M`` in ``[2, 16]``.
      std: Standard deviation of ``X`` (> 0).

    Returns:
      The optimal step ``D*`` (same units as ``std``), a Python float.

    Raises:
      ValueError: As :func:`quantization_mse`.
    """
    density = _density(distribution)
    bits = _check_bits(bits)
    std = _check_positive("std", std)
    return std * _optimal_unit_step(density, bits)


def snr_db(distribution: str, *, bits: int, step: float | None = None, std: float = 1.0) -> float:
    """Quantization SNR ``10 log10(std^2 / MSE)`` in dB.

    Args:
      distribution: One of :data:`DISTRIBUTIONS`.
      bits: Bit-width ``M`` in ``[2, 16]``.
      step: Step size ``D > 0``; ``None`` uses :func:`optimal_step`.
      std: Standard deviation of ``X`` (> 0).

    Returns:
      The SNR in dB (scale-free when ``step`` is ``None``), a Python float.

    Raises:
      ValueError: As :func:`quantization_mse`.

    >>> round(snr_db("uniform", bits=4), 1), round(snr_db("normal", bits=4), 1)
    (24.6, 19.8)
    """
    if step is None:
        step = optimal_step(distribution, bits=bits, std=std)
    mse = quantization_mse(distribution, bits=bits, step=step, std=std)
    return 10 * math.log10(std**2 / mse)


def snr_table(
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    distributions: Sequence[str] = ("uniform", "normal"),
) -> dict[int, dict[str, float]]:
    """Optimal-clip SNR (dB) per bit-width and distribution, the paper's uniform-vs-normal table.

    Args:
      bits: Bit-widths, each in ``[2, 16]``.
      distributions: Names from :data:`DISTRIBUTIONS`.

    Returns:
      ``{bits: {distribution: snr_db}}``.

    Raises:
      ValueError: For an unknown distribution or a bit-width outside ``[2, 16]``.
    """
    return {int(b): {d: snr_db(d, bits=b) for d in distributions} for b in bits}


def mse_step_curvature(
    distribution: str, *, bits: int, step: float | None = None, std: float = 1.0
) -> float:
    """Second derivative ``d^2 MSE / dD^2`` of :func:`quantization_mse` w.r.t. the step.

    The paper's sensitivity argument concerns this quantity at the optimum. It is scale-free
    (``MSE = std^2 f(D / std)``); at the optimum it is ``2^(M-1)`` for ``uniform``. The relative
    MSE increase for a step error ``D* (1 + eps)`` is about ``curvature * D*^2 eps^2 / (2 MSE*)``.

    Args:
      distribution: One of :data:`DISTRIBUTIONS`.
      bits: Bit-width ``M`` in ``[2, 16]``.
      step: Step at which to evaluate; ``None`` uses :func:`optimal_step`.
      std: Standard deviation of ``X`` (> 0).

    Returns:
      The curvature (dimensionless), a Python float.

    Raises:
      ValueError: As :func:`quantization_mse`.
    """
    density = _density(distribution)
    bits = _check_bits(bits)
    std = _check_positive("std", std)
    if step is None:
        unit_step = _optimal_unit_step(density, bits)
    else:
        unit_step = _check_positive("step", step) / std
    return _moments(density, bits, unit_step).d2


# --- Data types with per-group scales (issue 23) -------------------------------------------------
#
# A tensor of i.i.d. zero-mean values X is cut into groups of k (a block, or the whole tensor
# for a per-tensor scale); each group's scale s(M) is a function of its maximum M = max |X_i|,
# and each value becomes s * L(X / s) with L the nearest level of the element grid (clipped at
# its largest level). By exchangeability the per-value MSE is
#
#     MSE = E_M[ e(M, M) / k + (k - 1) / k * E[e(X, M) | |X| <= M] ],
#
# because given M the other k - 1 magnitudes are i.i.d. from |X| truncated at M. For each M the
# inner expectation is a finite sum of exact cell integrals (the partial moments of |X|, closed
# forms below); the outer one is Gauss-Legendre quadrature over u = F_M(M) = F(M)^k in (0, 1),
# i.e. over the order statistic's own quantiles: 32 panels of 8 nodes, further split at every
# M where the scale jumps (M crossing a power of two under "mx", an E4M3 rounding boundary
# under "nvfp4"), so each panel's integrand is smooth but for kinks.
#
# Densities: the generalised Gaussian p(x) ~ exp(-|x / a|^b) at unit variance, whose kurtosis
# Gamma(5/b) Gamma(1/b) / Gamma(3/b)^2 runs from 6 (b = 1, Laplace) through 3 (b = 2, normal) to
# 1.8 (b -> inf, uniform, handled exactly). Its partial moments of |X| are incomplete gamma
# functions: int_0^t x^j p_|X|(x) dx = a^j Gamma((j+1)/b) / Gamma(1/b) P((j+1)/b, (t/a)^b).
#
# Scale-free rules: "absmax" (s = M / max level) gives an MSE / variance that does not depend on
# the tensor's scale. The power-of-two "mx" rule and the E4M3 block scale of "nvfp4" do: the
# result is averaged over the tensor's scale 2^u, u uniform in [0, 1) (``scale_offsets`` points),
# i.e. over where the group maxima fall between powers of two. NVFP4's per-tensor FP32 scale is
# modelled by that same offset: the E4M3 block scale is taken in its normal range (it is, except
# for blocks below 1/28000 of the tensor's maximum).

FORMAT_SCALE_RULES = ("absmax", "mx", "nvfp4")
NAMED_KURTOSIS = {"uniform": 1.8, "normal": 3.0, "laplace": 6.0}
MIN_KURTOSIS, MAX_KURTOSIS = 1.8, 6.0
_PANELS, _NODES_PER_PANEL = 32, 8


def generalized_gaussian_kurtosis(shape: float) -> float:
    """Kurtosis ``Gamma(5/b) Gamma(1/b) / Gamma(3/b)^2`` of the generalised Gaussian of shape b.

    >>> round(generalized_gaussian_kurtosis(2.0), 12), round(generalized_gaussian_kurtosis(1.0), 9)
    (3.0, 6.0)
    """
    b = _check_positive("shape", shape)
    return math.exp(math.lgamma(5 / b) + math.lgamma(1 / b) - 2 * math.lgamma(3 / b))


def generalized_gaussian_shape(kurtosis: float) -> float:
    """The shape ``b`` whose generalised Gaussian has ``kurtosis`` (``inf`` for 1.8, uniform).

    Raises:
      ValueError: for a kurtosis outside [1.8, 6] (the family is used only there).
    """
    k = float(kurtosis)
    if not MIN_KURTOSIS <= k <= MAX_KURTOSIS:
        raise ValueError(f"kurtosis must be in [{MIN_KURTOSIS}, {MAX_KURTOSIS}]; got {kurtosis!r}.")
    if k == MIN_KURTOSIS:
        return math.inf
    # log-kurtosis excess is monotone in log b; b = 1e4 has kurtosis 1.8 + 3e-4.
    f = lambda log_b: generalized_gaussian_kurtosis(math.exp(log_b)) - k
    if f(math.log(1e4)) > 0:
        return 1e4
    return math.exp(optimize.brentq(f, math.log(0.9), math.log(1e4), xtol=1e-13))


def _abs_moments(shape: float, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """``int_0^t x^j p_|X|(x) dx`` for j = 0, 1, 2 at unit variance (t may be inf)."""
    if math.isinf(shape):  # Uniform on [-sqrt3, sqrt3].
        tc = np.minimum(t, _A)
        return tuple(tc ** (j + 1) / ((j + 1) * _A) for j in range(3))
    b = shape
    a = math.exp(0.5 * (math.lgamma(1 / b) - math.lgamma(3 / b)))
    with np.errstate(over="ignore"):  # (t / a)^b overflowing to inf is P(., inf) = 1.
        z = np.where(np.isinf(t), np.inf, (t / a) ** b)
    return tuple(a**j * math.exp(math.lgamma((j + 1) / b) - math.lgamma(1 / b))
                 * special.gammainc((j + 1) / b, z) for j in range(3))


def _abs_quantile(shape: float, log_p: np.ndarray) -> np.ndarray:
    """The quantile of |X| at probability ``exp(log_p)`` (log scale: p may be 1 - 1e-12)."""
    p, q = np.exp(log_p), -np.expm1(log_p)
    if math.isinf(shape):
        return _A * p
    b = shape
    a = math.exp(0.5 * (math.lgamma(1 / b) - math.lgamma(3 / b)))
    z = np.where(p < 0.5, special.gammaincinv(1 / b, p), special.gammainccinv(1 / b, q))
    return a * z ** (1 / b)


def _side_error(levels: np.ndarray, scale: np.ndarray, m: np.ndarray, shape: float):
    """For non-negative ascending ``levels`` (one sign of the grid): ``int_0^m e(x) p_|X| dx``
    and ``e(m)``, where ``e(x) = (x - s L(x / s))^2``; arrays over the nodes."""
    c = scale[:, None] * levels[None, :]
    mids = scale[:, None] * ((levels[1:] + levels[:-1]) / 2)[None, :]
    zero = np.zeros_like(m)[:, None]
    bounds = np.minimum(np.concatenate([zero, mids, np.full_like(zero, np.inf)], axis=1),
                        m[:, None])
    mom = [np.diff(v, axis=1) for v in _abs_moments(shape, bounds)]
    inner = np.sum(mom[2] - 2 * c * mom[1] + c * c * mom[0], axis=1)
    top = np.min(np.abs(m[:, None] - c), axis=1) ** 2
    return inner, top


def _format_scale(m: np.ndarray, top: float, rule: str, offset: float) -> np.ndarray:
    """The group scale for group maxima ``m`` of a tensor scaled by ``2^offset`` (in unit
    terms: divided by ``2^offset`` again)."""
    if rule == "absmax":
        return m / top
    if rule == "mx":
        emax = math.floor(math.log2(top))
        return np.exp2(np.floor(np.log2(m) + offset) - emax - offset)
    # nvfp4: round-to-nearest-even E4M3 block scale (normal range: 3 mantissa bits).
    v = np.log2(m / top) + offset
    e = np.floor(v)
    return np.exp2(e - 3 + 0) * _round_half_even(np.exp2(v - e + 3)) * np.exp2(-offset)


def _scale_jumps(shape: float, k: int, top: float, rule: str, offset: float) -> np.ndarray:
    """The group maxima where ``_format_scale`` jumps (none for absmax), within the range of
    the maximum of ``k`` values."""
    if rule == "absmax":
        return np.zeros(0)
    lo, hi = _abs_quantile(shape, np.log(np.array([1e-12, 1 - 1e-15])) / k)
    exps = np.arange(math.floor(math.log2(lo / top)) - 1, math.ceil(math.log2(hi / top)) + 2)
    if rule == "mx":  # floor(log2 M + offset) steps at M = 2^(j - offset).
        jumps = top * np.exp2(exps - offset) / 2.0 ** math.floor(math.log2(top))
    else:  # E4M3 rounding steps halfway between (8 + i) / 8 and (9 + i) / 8 in each binade.
        mant = (8 + np.arange(8) + 0.5) / 8
        jumps = (top * np.exp2(exps - offset)[:, None] * mant[None, :]).ravel()
    return jumps[(jumps > lo) & (jumps < hi)]


def _max_quadrature(shape: float, k: int, jumps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (group maxima) and weights of the expectation over the maximum of ``k`` values:
    Gauss-Legendre in ``u = F(M)^k`` on panels split at the integrand's jumps."""
    jumps_u = np.exp(k * np.log(np.clip(_abs_moments(shape, jumps)[0], 1e-300, 1.0)))
    edges = np.unique(np.concatenate([np.linspace(0.0, 1.0, _PANELS + 1), jumps_u]))
    x, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    half = np.diff(edges)[:, None] / 2
    u = ((edges[:-1, None] + edges[1:, None]) / 2 + half * x[None, :]).ravel()
    weights = (half * w[None, :]).ravel()
    m = _abs_quantile(shape, np.log(u) / k)
    # A node at u that rounds to 0 or 1 (quantile 0 or inf) carries no weight worth keeping.
    keep = (m > 0) & np.isfinite(m)
    return m[keep], weights[keep]


def _round_half_even(v: np.ndarray) -> np.ndarray:
    return np.round(v)  # NumPy rounds half to even.


def format_mse(
    kurtosis: float | str,
    *,
    levels: Sequence[float] | np.ndarray,
    block_size: int,
    scale_rule: str = "absmax",
    scale_offsets: int = 24,
) -> float:
    r"""MSE per value of a unit-variance tensor under a data type with per-group scales.

    The tensor's values are i.i.d. generalised Gaussian with the given kurtosis (1.8: uniform,
    3: normal, 6: Laplace); groups of ``block_size`` values share a scale set by the group's
    maximum under ``scale_rule`` (method in the comment above this function's section of
    ``kure_jax/theory.py``: exact cell integrals given the group maximum, quadrature over the
    maximum's distribution).

    Args:
      kurtosis: a number in [1.8, 6] or one of ``"uniform"``, ``"normal"``, ``"laplace"``.
      levels: every value of the element grid, e.g.
        :func:`kure_jax.quant.formats.element_levels`; must contain 0, need not be symmetric.
      block_size: values per scale group (a per-tensor scale: the tensor's size).
      scale_rule: ``"absmax"`` (``s = M / max level``), ``"mx"`` (OCP MX: ``2^(floor(log2 M)
        - emax)``) or ``"nvfp4"`` (``M / max level`` rounded to E4M3).
      scale_offsets: points of the average over the tensor's scale (``"mx"``, ``"nvfp4"``).

    Returns:
      ``E[(X - Q(X))^2]`` for ``Var X = 1``; the SNR in dB is ``-10 log10`` of it.

    Raises:
      ValueError: for a kurtosis outside [1.8, 6] or unknown name, an unknown rule, a
        ``block_size < 1``, or levels without 0.
    """
    if isinstance(kurtosis, str):
        if kurtosis not in NAMED_KURTOSIS:
            raise ValueError(f"kurtosis must be a number or one of {tuple(NAMED_KURTOSIS)}; "
                             f"got {kurtosis!r}.")
        kurtosis = NAMED_KURTOSIS[kurtosis]
    shape = generalized_gaussian_shape(kurtosis)
    if scale_rule not in FORMAT_SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {FORMAT_SCALE_RULES}; got {scale_rule!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) \
            or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1; got {block_size!r}.")
    grid = np.unique(np.asarray(levels, np.float64))
    if not np.any(grid == 0):
        raise ValueError("levels must contain 0.")
    top = float(np.max(np.abs(grid)))
    sides = (grid[grid >= 0], -grid[grid <= 0][::-1])
    k = block_size
    offsets = [0.0] if scale_rule == "absmax" else (np.arange(scale_offsets) + 0.5) / scale_offsets
    total = 0.0
    for offset in offsets:
        m, weights = _max_quadrature(shape, k, _scale_jumps(shape, k, top, scale_rule, offset))
        mass = _abs_moments(shape, m)[0]
        scale = _format_scale(m, top, scale_rule, offset)
        inner, at_max = (sum(parts) / 2 for parts in zip(
            *(_side_error(side, scale, m, shape) for side in sides), strict=True))
        h = at_max / k + (k - 1) / k * inner / mass
        total += float(np.sum(weights * h))
    return total / len(offsets)


def format_snr_db(kurtosis: float | str, **format_kwargs) -> float:
    """``-10 log10`` of :func:`format_mse` (unit variance), in dB; same arguments."""
    return -10.0 * math.log10(format_mse(kurtosis, **format_kwargs))


def best_kurtosis(
    *, levels: Sequence[float] | np.ndarray, block_size: int, scale_rule: str = "absmax",
    grid: Sequence[float] | None = None,
) -> tuple[float, float]:
    """The kurtosis in [1.8, 6] with the smallest :func:`format_mse`, and that MSE.

    Evaluated on ``grid`` (default 1.8, 2.0, ..., 6.0), then refined by a bounded scalar
    search between the best point's neighbours.

    Returns:
      ``(kurtosis, mse)``.
    """
    grid = np.arange(1.8, 6.0001, 0.2) if grid is None else np.asarray(grid, np.float64)
    kw = {"levels": levels, "block_size": block_size, "scale_rule": scale_rule}
    errors = [format_mse(float(k), **kw) for k in grid]
    i = int(np.argmin(errors))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    if hi > lo:
        res = optimize.minimize_scalar(lambda k: format_mse(float(k), **kw), bounds=(lo, hi),
                                       method="bounded", options={"xatol": 1e-3})
        if res.fun < errors[i]:
            return float(res.x), float(res.fun)
    return float(grid[i]), float(errors[i])
