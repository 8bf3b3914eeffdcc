"""benchmarks/kernel_times.py --trace: device times read from jax.profiler's trace.

The next GPU run depends on this profile (benchmarks/run_gpu_followup.sh), so its parsing is
checked here on CPU, where the trace holds XLA's thunks: every op gets its own kernels, the
copy is the yardstick, and the marker-kernel fallback (for device events that name no XLA
module) attributes exactly the same kernels as the module names do.
"""

import gzip
import importlib
import json
import os
import subprocess
import sys

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
