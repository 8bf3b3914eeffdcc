"""Evaluates trained checkpoints under many quantizers: the quantization-robustness report.

    python eval.py --checkpoint runs/mnist5k_kure --checkpoint runs/mnist5k_baseline \\
        --sweep configs/sweeps/default.py --out runs/eval

    python eval.py --model my_models:make --params my_params.safetensors --dataset mnist5k \
        --out runs/eval_mine

``--checkpoint`` takes a train.py workdir, a ``checkpoints/``/``best/`` directory or one step
directory, optionally named ``GROUP=PATH`` (checkpoints sharing a group, e.g. seeds, are also
averaged in the report). The training config travels with the checkpoint, so no model flags are
needed. ``--model MODULE:FACTORY`` evaluates a model of your own instead (a Linen or NNX module
or an ``(apply_fn, params_template)`` pair; see kure_jax/evaluation/factory.py), with
``--params`` an Orbax checkpoint directory or a ``.safetensors`` file and ``--dataset`` a
registered dataset. Writes ``results.json`` (updated after every task, so Ctrl-C keeps the
finished points), ``results.csv``, ``report.md`` and PNG plots into ``--out`` and prints the
summary table.

The test batch is sharded over all devices (``--devices N``: the first N); ``--distributed``
runs one process per host (TPU pod, GPU cluster), each reading its share of the test split,
with process 0 writing the outputs. The points equal one device's to float32 rounding, and bit
for bit with ``--micro_batch M`` (see kure_jax/evaluation/parallel.py). Each task's images/s
is shown in the progress bar and recorded in ``results.json`` (``timings``).

Exit codes: 0 done; 2 bad arguments, sweep file/key, checkpoint, model or params, or a missing
package of a real runtime of ``runtimes.schemes`` (one ``error:`` line on stderr); 130
interrupted.
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
    parser.add_argument("--checkpoint", action="append", metavar="[GROUP=]DIR",
                        help="train.py checkpoint to evaluate (repeat for several)")
    parser.add_argument("--model", metavar="MODULE:FACTORY",
                        help="your own model instead of --checkpoint: a factory returning a "
                             "Linen/NNX module or (apply_fn, params_template)")
    parser.add_argument("--params", metavar="PATH",
                        help="with --model: an Orbax checkpoint directory or a .safetensors file")
    parser.add_argument("--dataset", metavar="NAME",
                        help="with --model: the dataset to evaluate on, e.g. mnist5k")
    parser.add_argument("--name", help="with --model: its label in the report "
                                       "(default: MODULE:FACTORY)")
    parser.add_argument("--sweep", default=str(pathlib.Path(__file__).parent / "configs" /
                                               "sweeps" / "default.py"),
                        help="sweep config file (default: configs/sweeps/default.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help='override a sweep key, e.g. --set "weight.bits=(4, 2)"')
    parser.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="checkpoint of a workdir to use (default: best eval accuracy)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parallel = parser.add_argument_group(
        "data parallelism", "the test batch is sharded over all devices (of all processes "
        "with --distributed); results equal one device's to float32 rounding, and bit for bit "
        "with --micro_batch")
    parallel.add_argument("--devices", type=int, metavar="N",
                          help="evaluate on the first N devices only (default: all)")
    parallel.add_argument("--micro_batch", type=int, metavar="M",
                          help="rows per model call on each device: with M set, the points "
                               "are bit-identical on any device/process count (the eval batch "
                               "is rounded up to a multiple of M x devices)")
    parallel.add_argument("--distributed", action="store_true",
                          help="multi-host run (TPU pod, GPU hosts): call "
                               "jax.distributed.initialize() first; run the same command on "
                               "every host, each reads its share of the test split")
    parallel.add_argument("--coordinator_address", metavar="HOST:PORT",
                          help="with --distributed outside a detected cluster: process 0's "
                               "address")
    parallel.add_argument("--num_processes", type=int,
                          help="with --distributed and --coordinator_address")
    parallel.add_argument("--process_id", type=int,
                          help="with --distributed and --coordinator_address")
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


def _argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of --checkpoint / --model flags, or ``None``."""
    if args.model and args.checkpoint:
        return ("--model and --checkpoint are mutually exclusive: evaluate either train.py "
                "checkpoints or one model of your own per run.")
    if args.model:
        missing = [flag for flag, value in (("--params", args.params),
                                            ("--dataset", args.dataset)) if not value]
        if missing:
            return f"--model needs {' and '.join(missing)}."
        return None
    if not args.checkpoint:
        return "give --checkpoint DIR (repeatable) or --model MODULE:FACTORY."
    if args.devices is not None and (args.devices < 1 or args.distributed):
        return ("--devices N (>= 1) picks devices of a single-process run; got "
                f"{args.devices}{' with --distributed' * args.distributed}.")
    if not args.distributed and any(v is not None for v in (
            args.coordinator_address, args.num_processes, args.process_id)):
        return "--coordinator_address, --num_processes and --process_id need --distributed."
    extra = [flag for flag, value in (("--params", args.params), ("--dataset", args.dataset),
                                      ("--name", args.name)) if value]
    if extra:
        return (f"{', '.join(extra)} go(es) with --model only (a checkpoint carries its own "
                "weights and dataset).")
    return None


def _devices(devices: list, count: int | None) -> list:
    """The first ``count`` devices (all if ``None``).

    Raises:
      ValueError: if fewer are present.
    """
    if count is None:
        return devices
    if count > len(devices):
        raise ValueError(f"--devices {count}: only {len(devices)} device(s) are present.")
    return devices[:count]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _argument_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    # Orbax logs a warning per read-only restore through absl; keep stderr for real errors.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import jax

    if args.distributed:
        from kure_jax._distributed import initialize

        initialize(args.coordinator_address, args.num_processes, args.process_id)
    from kure_jax._interrupts import sigint_is_ours
    from kure_jax.evaluation import (
        CheckpointError,
        EvalMesh,
        evaluate_factory,
        load_sweep,
        run_sweep,
        summary_table,
    )
    from kure_jax.evaluation.runtimes import RuntimePackageError

    interrupts = _Interrupts()
    previous = signal.getsignal(signal.SIGINT)
    if sigint_is_ours():
        signal.signal(signal.SIGINT, interrupts.handle)
    chief = jax.process_index() == 0
    try:
        spec = load_sweep(args.sweep, args.set)
        progress = False if args.no_progress or not chief else None
        mesh = EvalMesh(_devices(jax.devices(), args.devices), micro_batch=args.micro_batch)
        if args.model:
            data = evaluate_factory(args.model, args.params, args.dataset, spec, out=args.out,
                                    name=args.name, progress=progress,
                                    after_task=interrupts.check, mesh=mesh)
        else:
            data = run_sweep(args.checkpoint, spec, args.out, which=args.which,
                             progress=progress, after_task=interrupts.check, mesh=mesh)
    except (CheckpointError, ValueError, RuntimePackageError) as err:  # ModelError: ValueError
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
    if not chief:
        return 0  # process 0 prints and writes the report
    grouped = len({c["group"] for c in data["checkpoints"]}) < len(data["checkpoints"])
    print(summary_table(data, by_group=grouped))
    skipped = len(data.get("skipped", []))
    note = f" ({skipped} skipped, reasons in the report)" if skipped else ""
    print(f"\n{len(data['points'])} points{note}; report: {pathlib.Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
