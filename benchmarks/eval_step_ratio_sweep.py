"""Times the step-ratio sweep of one checkpoint: one mapped program vs Python loops.

Question: is evaluating the 61 step ratios of ``eval.py``'s sweep as one compiled program worth
it? Results in BENCHMARKS.md ("eval.py sweep"). Run (CPU is enough):

    python benchmarks/eval_step_ratio_sweep.py --checkpoint runs/mnist5k_kure [--bits 4 3]

For each bit width it evaluates the default ratio grid (0.7..1.3, 61 points) on the test split
four ways and prints the wall time of each, compilation included (each is run once, cold):

* ``mapped chunk=1``: :func:`kure_jax.evaluation.mapped_eval_step`, one program, a
  compiled ``lax.map`` loop over the ratios (what ``eval.py`` runs by default);
* ``mapped chunk=C``: the same with ``C`` ratios vmapped at a time;
* ``loop, ratio as array``: a Python loop calling one jitted (quantise + forward) step per ratio;
  the ratio is an array argument, so it compiles once but dispatches once per point;
* ``loop, recompiling``: a Python loop over ``QuantPolicy(step_scale=r)`` policies, static
  values, hence one compilation per point (the naive way).

All four give the same accuracies; the script checks that they agree within one test image.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax.evaluation import Sweep, evaluate, load_checkpoint, make_eval_step
from kure_jax.evaluation.families.step_ratio import StepRatioConfig
from kure_jax.evaluation.families.weight import WeightConfig
from kure_jax.evaluation.forward import (
    classifier_apply,
    evaluate_mapped,
    mapped_eval_step,
    ptq_transform,
)
from kure_jax.evaluation.layers import target_layers


def _timed(fn: Callable[[], list[float]]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    accuracies = fn()
    return time.perf_counter() - start, accuracies


def time_step_ratio_sweep(
    checkpoint: str, *, bits: Sequence[int] = (4, 3), chunk: int = 8
) -> list[tuple[int, str, float]]:
    """``(bits, method, seconds)`` for each bit width and method (see the module docstring).

    Raises:
      CheckpointError: if the checkpoint cannot be restored.
      RuntimeError: if a method's accuracies differ from the first's by more than one test
        image (never for valid inputs).
    """
    spec, grid, weights = Sweep(), StepRatioConfig(), WeightConfig()  # the default sweep's
    loaded = load_checkpoint(checkpoint)
    model, dataset = loaded.model, loaded.dataset
    variables = {k: v for k, v in loaded.variables.items() if k != "quant"}
    where, _ = target_layers(loaded.target(), spec.layers)
    batches = list(dataset.eval_batches(global_batch_size=spec.eval_batch_size))
    apply_fn = classifier_apply(model)
    ratios = grid.ratios()
    rows = []
    for b in bits:
        policy = weights.policy(grid.quantizer, b)

        def mapped(c: int, policy=policy) -> list[float]:
            step = mapped_eval_step(
                apply_fn, ptq_transform(policy, where=where, over="step_ratio"), chunk=c)
            return [m.accuracy for m in evaluate_mapped(step, variables, jnp.asarray(ratios),
                                                        batches)]

        def loop_array(policy=policy) -> list[float]:
            quantize = jax.jit(ptq_transform(policy, where=where, over="step_ratio"))
            step = make_eval_step(apply_fn)
            return [evaluate(step, quantize(variables, jnp.float32(r)), batches).accuracy
                    for r in ratios]

        def loop_recompile(policy=policy) -> list[float]:
            out = []
            for r in ratios:
                scaled = dataclasses.replace(policy, step_scale=float(r))
                step = make_eval_step(lambda v, x, p=scaled: apply_fn(
                    ptq_transform(p, where=where)(v), x))
                out.append(evaluate(step, variables, batches).accuracy)
            return out

        reference = None
        for name, fn in ((f"mapped chunk=1 ({len(ratios)} points)", lambda: mapped(1)),
                         (f"mapped chunk={chunk}", lambda: mapped(chunk)),
                         ("loop, ratio as array (1 compile)", loop_array),
                         ("loop, recompiling per point", loop_recompile)):
            seconds, accuracies = _timed(fn)
            if reference is None:
                reference = np.asarray(accuracies)
            worst = float(np.max(np.abs(np.asarray(accuracies) - reference)))
            if worst > 1.0 / dataset.num_eval_examples + 1e-9:
                raise RuntimeError(f"{name}: accuracies differ by {worst} from the first method.")
            rows.append((b, name, seconds))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--chunk", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print("| bits | method | seconds |\n|---|---|---|")
    for b, name, seconds in time_step_ratio_sweep(args.checkpoint, bits=args.bits,
                                                  chunk=args.chunk):
        print(f"| W{b} | {name} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
