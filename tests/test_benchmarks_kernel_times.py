"""benchmarks/kernel_times.py --trace: device times read from jax.profiler's trace.

The next GPU run depends on this profile (benchmarks/run_gpu_followup.sh), so its parsing is
checked here on CPU, where the trace holds XLA's thunks: every op gets its own kernels, the
copy is the yardstick, and the marker-kernel fallback (for device events that name no XLA
module) attributes exactly the same kernels as the module names do. The A/B of the penalty's
per-tensor merge (benchmarks/_merge_ab.py) is checked against NumPy's moments.
"""

import gzip
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _training_helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


def import_benchmark(name):
    """A module of benchmarks/ (they import each other by plain name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_times")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "kernel_times.py", "--trace", str(root / "trace"), "--sizes", "14",
         "--out", str(root)],
        cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads((root / "kernel_times.json").read_text())


@pytest.mark.slow
def test_every_jnp_op_is_profiled(traced):
    _, rows = traced
    ops = import_benchmark("fake_quant_throughput")._ops(True)
    expected = [(name, impl) for name, impl, *_ in ops if impl != "pallas"]
    for dtype in ("float32", "bfloat16"):
        got = [(r["op"], r["impl"]) for r in rows if r["dtype"] == dtype]
        assert got == expected, dtype
    for r in rows:
        assert r["kernels_per_call"] >= 1 and r["device_us"] > 0, r
        if r["op"].startswith("copy"):
            assert r["of_copy_bw"] == 1.0
        # The per-kernel profile accounts for the op's whole time.
        assert sum(k["launches"] for k in r["kernels"]) == r["kernels_per_call"], r
        assert {k["name"] for k in r["kernels"]} == set(r["kernel_names"]), r
    # Threefry noise takes many more ops than the fused forward: kernels are not mixed up.
    by_op = {(r["dtype"], r["op"]): r["kernels_per_call"] for r in rows}
    assert by_op[("float32", "stochastic fwd, threefry noise")] > by_op[("float32", "fq fwd")]


def test_per_kernel_profile_takes_medians_over_calls():
    kt = import_benchmark("kernel_times")
    calls = [[("a", 10.0), ("b", 1.0), ("a", 5.0)], [("a", 20.0), ("b", 2.0), ("a", 4.0)],
             [("a", 30.0), ("b", 9.0), ("a", 3.0)]]
    assert kt._by_kernel(calls) == [{"name": "a", "launches": 2, "us": 0.024},
                                    {"name": "b", "launches": 1, "us": 0.002}]


@pytest.mark.slow
def test_marker_fallback_matches_module_names(traced):
    root, _ = traced
    kt = import_benchmark("kernel_times")
    trace = kt._latest_trace(root / "trace")
    events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    thunks = [e for e in events if e.get("ph") == "X" and "hlo_module" in e.get("args", {})]
    modules = sorted({e["args"]["hlo_module"].removeprefix("jit_").split("(")[0]
                      for e in thunks if "_op" in e["args"]["hlo_module"]},
                     key=lambda m: int(m[2:].split("_")[0]))
    by_module = kt._calls_from_trace(trace, modules)
    # The same kernels as a GPU trace without module names shows them: on a device process.
    device = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:X:0"}}]
    device += [{**e, "pid": 1, "args": {k: v for k, v in e["args"].items() if k != "hlo_module"}}
               for e in thunks]
    stripped = root / "stripped.json.gz"
    stripped.write_bytes(gzip.compress(json.dumps({"traceEvents": device}).encode()))
    assert kt._calls_from_trace(stripped, modules) == by_module
    assert len(by_module) == 2 * 6  # two dtypes x the six jnp/xla ops at one size


def _np_central_moments(x):
    x = np.asarray(x, np.float64).ravel()
    d = x - x.mean()
    return x.mean(), *(np.mean(d**k) for k in (2, 3, 4))


@pytest.mark.parametrize("reduce", ["segment", "masked"])
def test_merge_ab_variants_give_the_moments(reduce):
    # kernel_times.py --penalty's A/B of the per-tensor merge (benchmarks/_merge_ab.py): both
    # reductions must compute the same thing, the tensors' moments (here against float64 NumPy).
    ab = import_benchmark("_merge_ab")
    rng = np.random.default_rng(0)
    tensors = [rng.normal(3.0, 0.5, (7, 9, 5)), rng.laplace(0.0, 2.0, 64),
               rng.uniform(-1, 1, (33, 3)), np.full((5,), 2.5), rng.normal(0, 1, 1)]
    layout = ab.Layout.build([t.size for t in tensors], block=32)
    assert layout.num_blocks == 10 + 2 + 4 + 1 + 1
    stats = ab.block_stats([jnp.asarray(t, jnp.float32) for t in tensors], layout)
    mean, m2, m3, m4, absmax, scale = jax.jit(
        lambda s: ab.merge(s, layout, reduce=reduce))(stats)
    for i, t in enumerate(tensors):
        want_mean, *want = _np_central_moments(t)
        np.testing.assert_allclose(mean[i], want_mean, rtol=1e-6, atol=1e-6)
        got = [float(m[i]) * float(scale[i]) ** k
               for k, m in zip((2, 3, 4), (m2, m3, m4), strict=True)]
        spread = want[0] ** 0.5  # m3 ~ 0 for symmetric tensors: compare on the spread's scale
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * spread**3 + 1e-12)
        assert float(absmax[i]) == np.float32(np.abs(t).max())
    with pytest.raises(ValueError, match="reduce must be one of"):
        ab.merge(stats, layout, reduce="scatter")


def test_merge_ab_rows_agree_and_match_the_kernels_layout():
    ab = import_benchmark("_merge_ab")
    params = {"a": {"kernel": jnp.linspace(-1.0, 2.0, 5000).reshape(50, 100)},
              "b": {"kernel": jnp.cos(jnp.arange(300.0)).reshape(3, 100), "bias": jnp.ones(3)}}
    rows = list(ab.merge_ops(params))
    assert [(op, impl) for op, impl, _, _ in rows] == [("merge (segment)", "xla"),
                                                       ("merge (masked)", "xla")]
    (_, _, segment, stats), (_, _, masked, _) = rows
    for a, b in zip(jax.jit(segment)(stats), jax.jit(masked)(stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # The benchmark's blocks are the GPU kernel's (same workload as penalty(impl='pallas')).
    from kure_jax.kernels import _moment_kernels

    sizes = [3, 300, 5000, 4096, 70000]
    seg = _moment_kernels.Segments.build(sizes, _moment_kernels.GPU_BLOCK, "gpu")
    layout = ab.Layout.build(sizes)
    assert (layout.blocks, layout.starts, layout.num_blocks) == (
        seg.blocks, seg.starts, seg.num_programs)
    tid, valid = seg.block_counts()
    np.testing.assert_array_equal(layout.tensor_ids(), tid)
    np.testing.assert_array_equal(layout.valid(), valid)
