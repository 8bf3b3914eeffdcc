"""Shared helpers of the benchmark scripts: device description, timing, result files.

Timing method (every script): compile and run ``warmup`` times, then ``repeats`` times run the
jitted function ``calls`` times back to back (asynchronous dispatch, so the device queue stays
full) and ``block_until_ready`` on the last result; a repeat's time is its wall time / ``calls``.
The median over repeats is reported, with min and max. Ratios are taken between rows measured in
the same process, so they do not depend on the machine's absolute speed. For operations shorter
than the host's per-call dispatch cost (tens of microseconds), times measure dispatch, not the
device; the scripts say which rows that affects.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Common flags: ``--small`` (CPU sizes), ``--out DIR``, ``--repeats``, ``--calls``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true", help="CPU-sized problems.")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="Directory for <script>.json (default: $OUT).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats (median).")
    parser.add_argument("--calls", type=int, default=None, help="Calls per repeat.")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def device_info() -> dict[str, Any]:
    """The accelerator (or CPU model), JAX version and date of this run."""
    device = jax.devices()[0]
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def time_call(fn: Callable[..., Any], args: tuple, *, warmup: int = 2, repeats: int = 7,
              calls: int = 10, chain: bool = False) -> dict[str, float]:
    """Seconds per call of ``fn(*args)`` (see the module docstring); also the compile time.

    With ``chain=True`` each call's result is the next call's ``args`` (a training step that
    consumes its state), so calls cannot overlap and nothing is recomputed from stale inputs.
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        out = jax.block_until_ready(fn(*(out if chain else args)))
    if chain:
        args = out
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
            if chain:
                args = out
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "first_call_s": first}


class Recorder:
    """Collects result rows, prints them as they come and keeps ``<out>/<name>.json`` current.

    Only JSON is written (the device tool returns at most 8 files); ``markdown()`` renders the
    table, which the scripts print at the end and BENCHMARKS.md quotes.
    """

    def __init__(self, name: str, args: Any, settings: dict[str, Any]):
        self.name, self.out = name, args.out
        self.info = {**device_info(), "command": _command(name, args), **settings}
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        print(f"# {name}: " + ", ".join(f"{k}={v}" for k, v in self.info.items()), flush=True)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        self.save()  # Partial results survive a timeout.

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def save(self) -> None:
        if not self.out:
            return
        out = pathlib.Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"info": self.info, "rows": self.rows, "notes": self.notes}
        (out / f"{self.name}.json").write_text(json.dumps(data, indent=1, default=str))

    def markdown(self) -> str:
        lines = [f"### {self.name}", "", f"`{self.info['command']}`  ",
                 f"{self.info['backend']}: {self.info['device']} ({self.info['cpu']}), "
                 f"jax {self.info['jax']}, {self.info['date']}", ""]
        if self.rows:
            keys = list(dict.fromkeys(k for row in self.rows for k in row))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |"
                      for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _command(name: str, args: Any) -> str:
    flags = " ".join(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
                     for k, v in vars(args).items() if v not in (None, False) and k != "out")
    return f"python benchmarks/{name}.py {flags}".strip()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
