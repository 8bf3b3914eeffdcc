"""Evaluates trained models under many quantizers: the quantization-robustness report.

    python eval.py --checkpoint runs/mnist5k_kure --checkpoint runs/mnist5k_baseline \\
        --sweep configs/sweeps/default.py --out runs/eval

    python eval.py --checkpoint runs/tiny --sweep configs/sweeps/tiny.py \\
        --sweep.weight.bits='(4, 2)' --sweep.layers=kernels

    python eval.py --model my_models:make --params my_params.safetensors --dataset mnist5k \\
        --out runs/eval_mine

``--checkpoint`` takes a train.py workdir, a ``checkpoints/``/``best/`` directory or one step
directory, optionally named ``GROUP=PATH`` (checkpoints sharing a group, e.g. seeds, are also
averaged in the report); ``--which best|latest`` picks a workdir's step (recorded in
results.json with the step). The training config travels with the checkpoint, so no model
flags are needed. ``--model MODULE:FACTORY`` evaluates a model of your own instead (a Linen or
NNX module or an ``(apply_fn, params_template)`` pair; see kure_jax/evaluation/factory.py), with
``--params`` an Orbax checkpoint directory or a ``.safetensors`` file and ``--dataset`` a
registered dataset.

``--sweep`` is an ml_collections config file (default configs/sweeps/default.py, whose comments
document every key); ``--sweep.KEY=VALUE`` overrides one key, and an unknown key stops at
start-up naming the closest ones. Writes ``results.json`` (updated after every task, so Ctrl-C
keeps the finished points), ``results.csv``, ``report.md`` and PNG plots into ``--out`` and
prints the summary table; ``--noprogress`` hides the progress bar.

The test batch is sharded over all devices (``--devices N``: the first N); ``--distributed``
runs one process per host (TPU pod, GPU cluster), each reading its share of the test split,
with process 0 writing the outputs. The points equal one device's to float32 rounding, and bit
for bit with ``--micro_batch M`` (see kure_jax/evaluation/parallel.py).

Exit codes: 0 done; 2 a bad flag, sweep file or key, an ``--out`` that is a file or cannot be
written (checked before any checkpoint is restored), a missing, damaged or mismatched
checkpoint, a bad model or params file, non-finite weights, or a missing package of a real
runtime of ``runtimes.schemes`` (one ``error:`` line on stderr, no traceback); 130 interrupted.
"""

import pathlib
import sys

DEFAULT_SWEEP = str(pathlib.Path(__file__).parent / "configs" / "sweeps" / "default.py")


def main(argv: list[str] | None = None) -> int:
    from kure_jax.evaluation.cli import main as run

    return run(sys.argv[1:] if argv is None else argv, default_sweep=DEFAULT_SWEEP, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
