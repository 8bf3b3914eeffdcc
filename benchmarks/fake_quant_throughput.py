"""Fake-quant throughput vs a plain copy of the same tensor: jnp (XLA) path vs Pallas kernel.

Question: how close does fake quantisation get to the memory-bandwidth limit, measured by a
copy-like op (``y = -x``: one read, one write) on the same tensor in the same process?

Every row reports ``units``: the minimum memory traffic of the op in tensor-sizes (copy = 2:
read + write; given-step forward = 2; backward = 3: read ``x`` and ``g``, write ``dL/dx``;
absmax forward = 3: one more read for the maximum), the effective bandwidth
``units * bytes / time`` and ``of_copy_bw = (units / 2) * t_copy / t``, the fraction of the
copy's bandwidth. 1.0 means the op moves its minimum traffic as fast as a copy moves bytes.

Run: ``python benchmarks/fake_quant_throughput.py`` (GPU/TPU sizes 1M..256M elements) or
``--small`` (CPU: 64K..4M; the Pallas kernels then run only in interpret mode, at the smallest
size, to show they work: interpret mode is not a performance path and the CPU default is jnp).
"""

from __future__ import annotations

import functools

import _common
import jax
import jax.numpy as jnp

from kure_jax import quant
from kure_jax.quant.policy import QuantPolicy, quantize

BITS = 4


def _ops(interpret: bool) -> list[tuple[str, str, int, object, bool]]:
    """``(op, impl, units, fn, needs_cotangent)`` rows; the copy comes first."""
    pallas = {"impl": "pallas", "interpret": interpret}
    key, s = jax.random.key(0), jnp.float32(0.05)
    vjp = lambda fq: lambda x, g: jax.vjp(fq, x, s)[1](g)
    fq_jnp = lambda x, s: quant.fake_quant(x, s, bits=BITS)
    fq_pl = lambda x, s: quant.fake_quant(x, s, bits=BITS, **pallas)
    hash_sr = lambda impl_kw: lambda x: quant.fake_quant(
        x, s, bits=BITS, rounding="stochastic", key=key, noise="hash", **impl_kw)
    return [
        ("copy (y=-x)", "xla", 2, lambda x: -x, False),
        ("fq fwd", "jnp", 2, lambda x: fq_jnp(x, s), False),
        ("fq fwd", "pallas", 2, lambda x: fq_pl(x, s), False),
        ("fq bwd (vjp)", "jnp", 3, vjp(fq_jnp), True),
        ("fq bwd (vjp)", "pallas", 3, vjp(fq_pl), True),
        ("absmax fq fwd", "jnp", 3, lambda x: quantize(x, QuantPolicy(bits=BITS)), False),
        ("absmax fq fwd", "pallas", 3,
         lambda x: quantize(x, QuantPolicy(bits=BITS), **pallas), False),
        ("stochastic fwd, threefry noise", "jnp", 2, lambda x: quant.fake_quant(
            x, s, bits=BITS, rounding="stochastic", key=key), False),
        ("stochastic fwd, hash noise", "jnp", 2, hash_sr({"impl": "jnp"}), False),
        ("stochastic fwd, hash noise", "pallas", 2, hash_sr(pallas), False),
    ]


def _extra(parser) -> None:
    parser.add_argument("--sizes", default=None,
                        help="Comma-separated log2 element counts (e.g. 24,26); skips the "
                             "block-shape sweep.")


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _extra)
    on_cpu = jax.default_backend() == "cpu"
    small = args.small or on_cpu
    sizes = [1 << 16, 1 << 18, 1 << 20, 1 << 22] if small else [1 << p for p in (20, 22, 24,
                                                                                   26, 28)]
    if args.sizes:
        sizes = [1 << int(p) for p in args.sizes.split(",")]
    repeats, calls = args.repeats or (5 if small else 7), args.calls or (5 if small else 20)
    rec = _common.Recorder("fake_quant_throughput", args, {"bits": BITS, "repeats": repeats,
                                                           "calls": calls})
    timer = functools.partial(_common.time_call, repeats=repeats, calls=calls)
    for dtype in (jnp.float32, jnp.bfloat16):
        for n in sizes:
            x = jax.random.normal(jax.random.key(1), (n // 1024, 1024), dtype)
            g = jax.random.normal(jax.random.key(2), x.shape, dtype)
            nbytes = x.size * x.dtype.itemsize
            t_copy = None
            for name, impl, units, fn, needs_g in _ops(on_cpu):
                if impl == "pallas" and on_cpu and n != sizes[0]:
                    continue  # Interpret mode: one small size shows it runs; no timing value.
                label = "pallas (interpret)" if impl == "pallas" and on_cpu else impl
                try:
                    t = timer(jax.jit(fn), (x, g) if needs_g else (x,))
                except Exception as e:  # Record a failed kernel and go on with the others.
                    rec.add({"dtype": dtype.__name__, "elements": n, "op": name,
                             "impl": label, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                if t_copy is None:
                    t_copy = t["median_s"]
                rec.add({"dtype": dtype.__name__, "elements": n, "op": name,
                         "impl": label, "units": units, "time_us": 1e6 * t["median_s"],
                         "GB_per_s": units * nbytes / t["median_s"] / 1e9,
                         "of_copy_bw": units / 2 * t_copy / t["median_s"],
                         "vs_jnp": None, "compile_s": t["first_call_s"]})
            _fill_speedups(rec, dtype.__name__, n)
    if not small and not args.sizes:
        _block_sweep(rec, timer)
    rec.note("of_copy_bw = (units/2) * t_copy / t: 1.0 = the op's minimum traffic at copy speed; "
             "absmax variants need 3 units (the maximum is a global reduction read before "
             "quantising), so their physical ceiling is of_copy_bw = 1 only if both reads run "
             "at full bandwidth.")
    rec.note("vs_jnp = t_jnp / t_pallas for the same op (> 1: the kernel is faster).")
    rec.save()


def _fill_speedups(rec: _common.Recorder, dtype: str, n: int) -> None:
    """``vs_jnp = t_jnp / t_pallas`` for each op measured both ways at this size."""
    rows = [r for r in rec.rows if r["dtype"] == dtype and r["elements"] == n and "time_us" in r]
    jnp_times = {r["op"]: r["time_us"] for r in rows if r["impl"] == "jnp"}
    for r in rows:
        if r["impl"] != "jnp" and r["op"] in jnp_times:
            r["vs_jnp"] = jnp_times[r["op"]] / r["time_us"]


def _block_sweep(rec: _common.Recorder, timer) -> None:
    """Given-step forward kernel at 64M float32 elements for a few tile shapes."""
    n = 1 << 26
    x = jax.random.normal(jax.random.key(1), (n // 1024, 1024), jnp.float32)
    t_copy = timer(jax.jit(lambda x: -x), (x,))["median_s"]
    for block in [(1, 1024), (2, 1024), (4, 1024), (8, 1024), (16, 1024)]:
        fn = jax.jit(lambda x, b=block: quant.fake_quant(x, 0.05, bits=BITS, impl="pallas",
                                                         block_shape=b))
        try:
            t = timer(fn, (x,))["median_s"]
            rec.add({"dtype": "float32", "elements": n, "op": f"fq fwd block {block}",
                     "impl": "pallas", "units": 2, "time_us": 1e6 * t,
                     "GB_per_s": 2 * x.nbytes / t / 1e9, "of_copy_bw": t_copy / t})
        except Exception as e:
            rec.add({"dtype": "float32", "elements": n, "op": f"fq fwd block {block}",
                     "impl": "pallas", "error": f"{type(e).__name__}: {e}"[:300]})


if __name__ == "__main__":
    main()
