"""Device-side kernel times of the fake-quant ops and the KURE penalty (the profile).

Question: the wall-clock rows of ``fake_quant_throughput.py`` include the host's per-call
dispatch (tens of microseconds), which hides the device time of a tensor of a few million
elements. Two ways to read the device's own time:

``--trace DIR`` (any backend, no extra tool): runs every op ``CALLS`` times inside
``jax.profiler.trace`` and sums, per call, the durations of the XLA kernels (GPU/TPU: the
device's kernel events; CPU: XLA's thunks) that the trace attributes to the op's compiled
module (or, if the events name no module, that lie between the marker kernels described below),
then prints one line per op (and, for ops of several kernels, the time of each kernel: the
profile) and writes ``kernel_times.json`` to ``--out``. Caches are
not flushed, so tensors that fit in L2 read faster than from HBM. On CPU the Pallas rows are
skipped (interpret mode is not a performance path):

    python benchmarks/kernel_times.py --trace /tmp/trace --sizes 24,26 --penalty --out DIR

Nsight Compute (GPU, cold caches): each op runs a few times between two marker kernels
(``cos`` before, ``sin`` after), so that ``ncu`` can attribute every kernel to its op:

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \\
        --log-file ncu.csv python benchmarks/kernel_times.py --sizes 24,26
    python benchmarks/kernel_times.py --parse ncu.csv --labels stdout.txt --out DIR

``--penalty`` adds the KURE penalty + gradient over ResNet-18/50 params against one copy of
the same params, and the A/B of its per-tensor merge (``_merge_ab.py``: segment ops vs masked
reductions, on block statistics of the same params); ``--sizes ""`` runs only these.

``ncu`` flushes the caches before every kernel (its default ``--cache-control all``), so the
times are cold-L2 HBM times: a 16M-element bf16 tensor (32 MB) would otherwise sit partly in
the H100/H200's 50-60 MB L2. ``--parse`` writes ``kernel_times.json`` with, per op, the kernels
one call launches, their summed device time and the fraction of the copy's bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import gzip
import itertools
import json
import pathlib
import statistics

CALLS = 3
TOP_KERNELS = 8  # Kernels listed per op in the printed profile.


def _profiled(fn, args: tuple, label: dict) -> None:
    """Runs jitted ``fn(*args)`` ``CALLS`` times between the markers, then prints ``label``.

    A function that fails to compile is skipped and leaves no segment, so labels and segments
    stay paired.
    """
    compiled = _warmed(fn, args, label)
    if compiled is not None:
        _between_markers(compiled, args)
        print(json.dumps(label), flush=True)


def _warmed(fn, args: tuple, label: dict):
    """``jax.jit(fn)``, compiled and run once (so no compilation is profiled); ``None``, with a
    message, if it fails."""
    import jax

    compiled = jax.jit(fn)
    try:
        jax.block_until_ready(compiled(*args))
    except Exception as e:
        print(f"skip {label['op']} {label['impl']}: {type(e).__name__}", flush=True)
        return None
    return compiled


def _between_markers(compiled, args: tuple) -> None:
    """``CALLS`` calls of ``compiled(*args)`` between the begin and end marker kernels."""
    import jax
    import jax.numpy as jnp

    begin, end = _markers()
    tag = jnp.arange(7.0)
    jax.block_until_ready(begin(tag))
    for _ in range(CALLS):
        jax.block_until_ready(compiled(*args))
    jax.block_until_ready(end(tag))


@functools.cache
def _markers():
    """The ``cos`` (begin) and ``sin`` (end) marker kernels, jitted once."""
    import jax
    import jax.numpy as jnp

    return jax.jit(jnp.cos), jax.jit(jnp.sin)


def _fake_quant_rows(sizes: list[int]):
    """``(fn, args, label)`` of every fake-quant op at every size, copy first per size."""
    import jax
    import jax.numpy as jnp
    from fake_quant_throughput import _ops

    for dtype in (jnp.float32, jnp.bfloat16):
        for n in sizes:
            x = jax.random.normal(jax.random.key(1), (n // 1024, 1024), dtype)
            g = jax.random.normal(jax.random.key(2), x.shape, dtype)
            for name, impl, units, fn, needs_g in _ops(False):
                yield fn, (x, g) if needs_g else (x,), {
                    "dtype": dtype.__name__, "elements": n, "op": name, "impl": impl,
                    "units": units, "bytes": x.size * x.dtype.itemsize}


def _penalty_ops():
    """``(model, params, op, impl, fn, arg)``: a copy of all params vs the penalty + its
    gradient, and the A/B of the per-tensor merge inside it (``_merge_ab``: on block statistics
    of the same params, segment ops vs masked reductions)."""
    import jax
    import jax.numpy as jnp
    from _merge_ab import merge_ops

    import kure_jax
    from kure_jax.models import get_model

    pallas = functools.partial(kure_jax.penalty, impl="pallas")
    copy = lambda p: jax.tree.map(jnp.negative, p)
    for name in ("resnet18", "resnet50"):
        model = get_model(name, num_classes=1000)
        params = jax.jit(lambda k, model=model: model.init(
            k, jnp.zeros((1, 64, 64, 3)), train=False))(jax.random.key(0))["params"]
        yield name, params, "copy (all params)", "xla", copy, params
        yield name, params, "penalty+grad", "jnp", jax.value_and_grad(kure_jax.penalty), params
        yield name, params, "penalty+grad", "pallas", jax.value_and_grad(pallas), params
        for op, impl, fn, stats in merge_ops(params):
            yield name, params, op, impl, fn, stats


def _penalty_rows():
    """``(fn, args, label)``: the KURE penalty + gradient vs one copy of the same params.

    ``kure_penalty.py`` times these with the wall clock, where launching a function of ~160
    leaf buffers costs the host about a millisecond; here only the device's kernels count.
    """
    import jax

    for model, params, name, impl, fn, arg in _penalty_ops():
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        # units = 2 for every row: of_copy_bw is then t_copy / t, i.e. 1 / (time in copies).
        yield fn, (arg,), {"dtype": model, "elements": nbytes // 4, "op": name,
                           "impl": impl, "units": 2, "bytes": nbytes}


def _trace(rows, trace_dir: pathlib.Path, out: pathlib.Path | None) -> None:
    """Runs ``rows`` under ``jax.profiler.trace`` and summarises their kernel times."""
    import jax

    on_cpu = jax.default_backend() == "cpu"
    ops, modules = [], []
    for i, (fn, args, label) in enumerate(rows):
        if on_cpu and label["impl"] == "pallas":
            continue
        # A unique function name gives the op its own XLA module name in the trace.
        compiled = _warmed(_renamed(fn, f"kt{i}_op"), args, label)
        if compiled is not None:
            ops.append((label, compiled, args))
            modules.append(f"kt{i}_op")
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _, compiled, args in ops:
            _between_markers(compiled, args)
    calls = _calls_from_trace(_latest_trace(trace_dir), modules)
    _summarise([label for label, _, _ in ops], calls, out)


def _renamed(fn, name: str):
    def op(*args):
        return fn(*args)

    op.__name__ = op.__qualname__ = name
    return op


def _latest_trace(trace_dir: pathlib.Path) -> pathlib.Path:
    found = sorted(trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not found:
        raise SystemExit(f"jax.profiler.trace wrote no perfetto_trace.json.gz under {trace_dir}")
    return found[-1]


def _calls_from_trace(trace: pathlib.Path, modules: list[str]) -> list[list[list]]:
    """Each op's calls, each a list of ``(kernel, ns)``, read from a perfetto trace of the run.

    Kernel events: on a machine with an accelerator, the ``/device:`` processes' events (the
    host's launch events are not device time); on CPU, XLA's thunks. Where they carry an
    ``hlo_module`` argument they are attributed by module (``modules[i]`` is op ``i``'s) and
    told apart by ``run_id`` (else split in time order into ``CALLS`` equal parts); where they
    do not, by the marker kernels around each op, as in the ncu profile.
    """
    data = json.loads(gzip.decompress(trace.read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: str(e["args"]["name"]) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    timed = [e for e in events if e.get("ph") == "X"]
    device = [e for e in timed if names.get(e["pid"], "").startswith("/device:")]
    kernels = sorted(device or [e for e in timed if "hlo_module" in e.get("args", {})],
                     key=lambda e: e["ts"])
    as_pairs = lambda evs: [(e["name"], 1e3 * float(e["dur"])) for e in evs]
    if not any("hlo_module" in e.get("args", {}) for e in kernels):
        segments = _marker_segments(as_pairs(kernels))
        if len(segments) != len(modules):
            raise SystemExit(f"{trace}: {len(modules)} ops but {len(segments)} marker segments "
                             f"(processes: {sorted(set(names.values()))})")
        return [_split_calls(segment) for segment in segments]
    calls = []
    for module in modules:
        own = [e for e in kernels if module in e.get("args", {}).get("hlo_module", "")]
        if own and all("run_id" in e["args"] for e in own):
            runs = collections.defaultdict(list)
            for e in own:
                runs[e["args"]["run_id"]].append(e)
            split = [as_pairs(run) for run in runs.values()]
        else:
            split = _split_calls(as_pairs(own))
        if len(split) != CALLS or not all(split):
            raise SystemExit(f"{trace}: expected {CALLS} calls of {module} with kernels, found "
                             f"{[len(c) for c in split]}")
        calls.append(split)
    return calls


def _marker_segments(kernels: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    """The kernels between each ``cos`` (begin) and the next ``sin`` (end) marker kernel."""
    segments, current = [], None
    for kernel, ns in kernels:
        if "cos" in kernel.lower() and current is None:
            current = []
        elif "sin" in kernel.lower() and current is not None:
            segments.append(current)
            current = None
        elif current is not None:
            current.append((kernel, ns))
    return segments


def _split_calls(kernels: list) -> list[list]:
    """``CALLS`` equal parts of one op's kernels, in launch order."""
    per_call = len(kernels) // CALLS
    return [kernels[i * per_call:(i + 1) * per_call] for i in range(CALLS)]


def _parse(ncu_csv: pathlib.Path, labels: pathlib.Path, out: pathlib.Path | None) -> None:
    """Pairs the ncu kernel list with the op labels the run printed, in launch order."""
    rows = [r for r in csv.DictReader(_csv_lines(ncu_csv))
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    segments = _marker_segments([(r["Kernel Name"], float(r["Metric Value"].replace(",", "")))
                                 for r in rows])
    ops = [json.loads(line) for line in labels.read_text().splitlines()
           if line.startswith("{")]
    if len(ops) != len(segments):
        raise SystemExit(f"{len(ops)} labelled ops but {len(segments)} marker segments")
    _summarise(ops, [_split_calls(segment) for segment in segments], out)


def _summarise(ops: list[dict], calls_per_op: list[list[list]], out: pathlib.Path | None):
    """Prints and saves each op's median device time per call, its ``of_copy_bw`` and where
    that time goes (``kernels``: per kernel name, launches and median time per call).

    ``calls_per_op[i]`` lists, for each call of op ``i``, its ``(kernel name, ns)`` pairs.
    """
    results, copy_ns = [], {}
    for op, calls in zip(ops, calls_per_op, strict=True):
        per_call = len(calls[0])
        ns = statistics.median(sum(t for _, t in call) for call in calls)
        key = (op["dtype"], op["elements"])
        if op["op"].startswith("copy"):
            copy_ns[key] = ns
        results.append({**op, "kernels_per_call": per_call,
                        "kernel_names": sorted({k for k, _ in calls[0]}),
                        "kernels": _by_kernel(calls),
                        "device_us": ns / 1e3,
                        "GB_per_s": op["units"] * op["bytes"] / ns,
                        "of_copy_bw": op["units"] / 2 * copy_ns.get(key, float("nan")) / ns})
    for r in results:
        print(f"{r['dtype']:9s} {r['elements']:>10d} {r['op']:32s} {r['impl']:7s} "
              f"kernels={r['kernels_per_call']} {r['device_us']:8.1f} us "
              f"{r['GB_per_s']:7.0f} GB/s of_copy_bw={r['of_copy_bw']:.3f}")
        if r["kernels_per_call"] > 1 and not r["op"].startswith("copy"):  # Where time goes.
            for k in r["kernels"][:TOP_KERNELS]:
                print(f"    {k['us']:8.1f} us {k['launches']:4d}x {k['name'][:70]}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_times.json").write_text(json.dumps(results, indent=1))


def _by_kernel(calls: list[list]) -> list[dict]:
    """Per kernel name: launches per call and the median over calls of its summed time (us),
    longest first."""
    per_call = []
    for call in calls:
        ns, launches = collections.Counter(), collections.Counter()
        for name, t in call:
            ns[name] += t
            launches[name] += 1
        per_call.append((ns, launches))
    names = {name for ns, _ in per_call for name in ns}
    rows = [{"name": name, "launches": per_call[0][1][name],
             "us": statistics.median(ns[name] for ns, _ in per_call) / 1e3} for name in names]
    return sorted(rows, key=lambda r: (-r["us"], r["name"]))


def _csv_lines(path: pathlib.Path):
    """The CSV part of an ncu log (it starts at the header line, after ncu's own messages)."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path} has no CSV table (did ncu or the profiled program fail?): "
                         + " | ".join(lines[-3:]))
    return collections.deque(lines[start:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="24,26", help="Comma-separated log2 element counts.")
    parser.add_argument("--parse", type=pathlib.Path, default=None,
                        help="ncu CSV log to read instead of running.")
    parser.add_argument("--labels", type=pathlib.Path, default=None,
                        help="With --parse: the run's stdout (one JSON label per op).")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--trace", type=pathlib.Path, default=None,
                        help="Profile with jax.profiler into this folder (no ncu needed).")
    parser.add_argument("--penalty", action="store_true",
                        help="Also profile the KURE penalty + gradient over ResNet-18/50 "
                             "params against a copy of them (rows keyed by model name).")
    args = parser.parse_args()
    sizes = [1 << int(p) for p in args.sizes.split(",")] if args.sizes else []
    rows = itertools.chain(_fake_quant_rows(sizes), _penalty_rows() if args.penalty else ())
    if args.parse is not None:
        _parse(args.parse, args.labels, args.out)
    elif args.trace is not None:
        _trace(rows, args.trace, args.out)
    else:
        for fn, fn_args, label in rows:
            _profiled(fn, fn_args, label)


if __name__ == "__main__":
    main()
