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
