"""Evaluates trained checkpoints under many quantizers: the quantization-robustness report.

    python eval.py --checkpoint runs/mnist5k_kure --checkpoint runs/mnist5k_baseline \\
        --sweep configs/sweeps/default.py --out runs/eval

``--checkpoint`` takes a train.py workdir, a ``checkpoints/``/``best/`` directory or one step
directory, optionally named ``GROUP=PATH`` (checkpoints sharing a group, e.g. seeds, are also
averaged in the report). The training config travels with the checkpoint, so no model flags are
needed. Writes ``results.json`` (updated after every task, so Ctrl-C keeps the finished points),
``results.csv``, ``report.md`` and PNG plots into ``--out`` and prints the summary table.

Exit codes: 0 done; 2 bad sweep file/key or checkpoint (one ``error:`` line on stderr);
130 interrupted.
"""

import argparse
import logging
import pathlib
import signal
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Quantization-robustness sweep of trained checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[GROUP=]DIR",
                        help="checkpoint to evaluate (repeat for several)")
    parser.add_argument("--sweep", default=str(pathlib.Path(__file__).parent / "configs" /
                                               "sweeps" / "default.py"),
                        help="sweep config file (default: configs/sweeps/default.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help='override a sweep key, e.g. --set "weight.bits=(4, 2)"')
    parser.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="checkpoint of a workdir to use (default: best eval accuracy)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


class _Interrupts:
    """Ctrl-C that cannot be lost inside library code.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when it handles SIGINT;
    inside a Python callback of C code that discards any error of the callback (an attribute
    probe, say) the exception is dropped, and the sweep would run to its end. This handler
    also records the request, and :meth:`check` (called after every task) raises it again.
    """

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum, frame) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self, *_task_and_points) -> None:
        if self.requested:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Orbax logs a warning per read-only restore through absl; keep stderr for real errors.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from kure_jax._interrupts import sigint_is_ours
    from kure_jax.evaluation import CheckpointError, load_sweep, run_sweep, summary_table

    interrupts = _Interrupts()
    previous = signal.getsignal(signal.SIGINT)
    if sigint_is_ours():
        signal.signal(signal.SIGINT, interrupts.handle)
    try:
        spec = load_sweep(args.sweep, args.set)
        data = run_sweep(args.checkpoint, spec, args.out, which=args.which,
                         progress=False if args.no_progress else None,
                         after_task=interrupts.check)
    except (CheckpointError, ValueError) as err:
        # The late "Event loop is closed" tracebacks of a failed restore are dropped by
        # restore_for_eval (kure_jax/training/_orbax_noise.py): this stays the one line.
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished points are in {args.out}/results.json",
              file=sys.stderr)
        return 130
    finally:
        if signal.getsignal(signal.SIGINT) == interrupts.handle:
            signal.signal(signal.SIGINT, previous)
    grouped = len({c["group"] for c in data["checkpoints"]}) < len(data["checkpoints"])
    print(summary_table(data, by_group=grouped))
    print(f"\n{len(data['points'])} points; report: {pathlib.Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
