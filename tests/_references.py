"""NumPy references shared by the tests, written from the formulas (never calling kure_jax).

Each is written once here and imported by the tests that compare the library against it.
References that only one test file needs stay in that file.
"""

import numpy as np


def np_log_softmax(logits):
    """log softmax over the last axis in float64, shifted by the row max for stability."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels, num_classes=None, smoothing=0.0):
    """Mean softmax cross-entropy in float64 against integer ``labels``; with ``smoothing`` the
    targets are ``onehot * (1 - smoothing) + smoothing / num_classes``."""
    log_probs = np_log_softmax(logits)
    num_classes = log_probs.shape[-1] if num_classes is None else num_classes
    targets = np.eye(num_classes)[np.asarray(labels)] * (1 - smoothing) + smoothing / num_classes
    return float(-np.mean(np.sum(targets * log_probs, -1)))


def np_metrics(logits, labels):
    """``(accuracy, mean cross-entropy)`` of ``logits`` for integer ``labels``, float64."""
    logits = np.asarray(logits, np.float64)
    return (float(np.mean(logits.argmax(-1) == np.asarray(labels))),
            np_cross_entropy(logits, labels))


def np_kurtosis(w, ddof=0):
    """Pearson kurtosis m4 / var**2 of all of ``w`` in float64, var = m2 * n / (n - ddof)."""
    w = np.asarray(w, np.float64).ravel()
    n, d = w.size, w - w.mean()
    var = np.mean(d**2) * n / (n - ddof)
    return float(np.mean(d**4) / var**2)


def np_kurtosis_grad(w, ddof=0):
    """The gradient of ``np_kurtosis(w, ddof)`` with respect to ``w``, float64, ``w``'s shape
    (d = w - mean: 4 / (n var^2) (d^3 - m3) - 4 m4 / ((n - ddof) var^3) d)."""
    w = np.asarray(w, np.float64)
    n, d = w.size, w - w.mean()
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    var = m2 * n / (n - ddof)
    return 4 / (n * var**2) * (d**3 - m3) - 4 * m4 / ((n - ddof) * var**3) * d


def np_round(v, mode):
    """NumPy rounding: np.round is half-to-even; the others are built from floor in float64."""
    v = np.asarray(v)
    if mode == "nearest":
        return np.round(v)
    if mode == "floor":
        return np.floor(v)
    assert mode == "nearest_away"
    # |v| + 0.5 is exact in float64 for float32 v, so floor() sees the true value.
    v64 = v.astype(np.float64)
    return (np.sign(v64) * np.floor(np.abs(v64) + 0.5)).astype(v.dtype)


def np_fake_quant(x, scale, zero_point, qmin, qmax, mode="nearest", dtype=np.float32):
    """Quantise-dequantise ``(clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) *
    scale`` computed in ``dtype`` (float32 unless float64 is tested; None: the inputs' own
    NumPy promotion)."""
    if dtype is not None:
        x, scale, zero_point = (np.asarray(a, dtype) for a in (x, scale, zero_point))
    q = np.clip(np_round(x / scale, mode) + zero_point, qmin, qmax)
    out = (q - zero_point) * scale
    return out if dtype is None else out.astype(dtype)


def np_nested(x, bits, c=8, reduce=None, dtype=np.float32):
    """Matryoshka slice: the top ``bits`` bits of ``x``'s min-max ``c``-bit codes (min and max
    over the axes ``reduce``, all of them if None), read back with the ``c``-bit scale. In
    ``dtype``: float32 follows kure_jax.quant.nested op for op, float64 is the exact value."""
    x = np.asarray(x, dtype)
    lo, hi = x.min(axis=reduce, keepdims=True), x.max(axis=reduce, keepdims=True)
    scale = np.maximum((hi - lo) / dtype(2**c - 1), np.finfo(np.float32).tiny).astype(dtype)
    zero = np.round(-lo / scale)
    codes = np.clip(np.round(x / scale) + zero, 0, 2**c - 1)
    step = dtype(2 ** (c - bits))
    top = np.clip(np.floor(codes / step + dtype(0.5)), 0, 2**bits - 1) * step
    return ((top - zero) * scale).astype(dtype)
