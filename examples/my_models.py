"""A user's own model for ``eval.py --model``: a tiny Linen CNN and its factory.

    PYTHONPATH=examples python eval.py --model my_models:make --params my_params.safetensors \\
        --dataset mnist5k --out report/

``make()`` is the factory (see ``kure_jax/evaluation/factory.py``): it takes no argument and
returns the unbound Linen module, so eval.py builds its variables for the dataset's images,
reads the params file into them and sweeps the model, W/A PTQ included. ``make_nnx`` and
``make_apply_fn`` return the same network as a Flax NNX module and as a plain-JAX
``(apply_fn, params_template)`` pair, the two other forms of the protocol (their W/A
points are skipped: activations can be intercepted only in Linen layers).

Running this file trains the Linen CNN for a few hundred steps on the shipped digits and
writes its variables to ``my_params.safetensors`` and the Orbax directory ``my_params/``:

    python examples/my_models.py [--steps 200] [--out .]
"""

from __future__ import annotations

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_CLASSES = 10
FEATURES = (8, 16)
HIDDEN = 32


class TinyCNN(nn.Module):
    """conv1 3x3 -> ReLU -> 2x2 avg-pool -> conv2 3x3 -> ReLU -> 2x2 avg-pool -> flatten ->
    hidden (dense) -> ReLU -> head (dense): images ``(B, 28, 28, 1)`` to logits ``(B, 10)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, features in enumerate(FEATURES, start=1):
            x = nn.relu(nn.Conv(features, (3, 3), name=f"conv{index}")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(HIDDEN, name="hidden")(x))
        return nn.Dense(NUM_CLASSES, name="head")(x)


def make() -> nn.Module:
    """The factory of ``eval.py --model my_models:make``: the Linen module."""
    return TinyCNN()


class TinyCNNNNX(nnx.Module):
    """:class:`TinyCNN` in Flax NNX: the same layers, names and parameter shapes."""

    def __init__(self, *, rngs: nnx.Rngs, image_shape: tuple[int, int, int] = (28, 28, 1)):
        channels = (image_shape[-1], *FEATURES)
        self.conv1 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels[1], channels[2], (3, 3), rngs=rngs)
        flat = (image_shape[0] // 4) * (image_shape[1] // 4) * FEATURES[-1]
        self.hidden = nnx.Linear(flat, HIDDEN, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in (self.conv1, self.conv2):
            x = nnx.avg_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.hidden(x)))


def make_nnx() -> nnx.Module:
    """Factory of the NNX form (``--model my_models:make_nnx``)."""
    return TinyCNNNNX(rngs=nnx.Rngs(0))


def tiny_cnn_apply(params: dict, images: jax.Array) -> jax.Array:
    """:class:`TinyCNN` in plain JAX: ``params`` is its Linen ``variables["params"]``
    (``{"conv1": {"kernel", "bias"}, ..., "head": ...}``), images ``(B, 28, 28, 1)``."""
    x = images
    for name in ("conv1", "conv2"):
        x = jax.lax.conv_general_dilated(
            x, params[name]["kernel"], window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[name]["bias"]
        x = jax.nn.relu(x)
        b, h, w, c = x.shape
        x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def make_apply_fn() -> tuple:
    """Factory of the plain-JAX form (``--model my_models:make_apply_fn``): ``(apply_fn,
    params_template)``, the template with the shapes of :class:`TinyCNN` on 28x28x1 digits."""
    template = jax.eval_shape(lambda x: TinyCNN().init(jax.random.key(0), x)["params"],
                              jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    return tiny_cnn_apply, template


def train(steps: int = 200, seed: int = 0, batch_size: int = 64) -> dict:
    """Trains :class:`TinyCNN` with Adam on the shipped digits; returns its variables."""
    import optax

    from kure_jax.data import load_mnist5k

    data = load_mnist5k("train")
    model = make()
    variables = model.init(jax.random.key(seed), data.images[:1])
    tx = optax.adam(3e-3)
    opt_state = tx.init(variables)

    @jax.jit
    def step(variables, opt_state, images, labels):
        def loss(v):
            logits = model.apply(v, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(variables)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(variables, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.integers(0, len(data.labels), batch_size)
        variables, opt_state = step(variables, opt_state, data.images[index], data.labels[index])
    return variables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=".", help="directory of the two params files")
    args = parser.parse_args()
    import orbax.checkpoint as ocp

    from kure_jax.evaluation import save_safetensors

    variables = train(args.steps)
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(variables, out / "my_params.safetensors")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "my_params", variables, force=True)
    checkpointer.wait_until_finished()
    print(f"wrote {out / 'my_params.safetensors'} and {out / 'my_params'}/")


if __name__ == "__main__":
    main()
