"""Renders the JSON results of the benchmark scripts as Markdown, for BENCHMARKS.md.

Run: ``python benchmarks/report.py DIR [--columns a,b,...]``, with ``DIR`` the ``--out``/``$OUT``
folder of a run (e.g. the files that ``benchmarks/run_gpu.sh`` returns).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import _common

ORDER = ("gpu_check", "fake_quant_throughput", "kure_penalty", "train_step")


def render(path: pathlib.Path, columns: list[str] | None = None) -> str:
    """Markdown of one result file (all its columns, or ``columns`` in that order)."""
    data = json.loads(path.read_text())
    rec = _common.Recorder.__new__(_common.Recorder)
    rec.name, rec.info, rec.notes = path.stem, data["info"], data["notes"]
    rec.rows = [{k: row.get(k, "") for k in columns} if columns else row for row in data["rows"]]
    return rec.markdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--columns", default=None, help="Comma-separated columns to keep.")
    args = parser.parse_args()
    columns = args.columns.split(",") if args.columns else None
    files = sorted(args.directory.glob("*.json"),
                   key=lambda p: ORDER.index(p.stem) if p.stem in ORDER else len(ORDER))
    for path in files:
        print(render(path, columns))


if __name__ == "__main__":
    main()
