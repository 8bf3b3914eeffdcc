"""QAT of Flax NNX models: same logits and gradients as the Linen path on the same weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kure_jax
from kure_jax import LayerRule
from kure_jax.qat import QATConfig
from kure_jax.qat import nnx as qat_nnx


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.Conv(6, (3, 3), strides=2, name="conv2")(x)  # signed input to the dense layer
        x = nn.relu(nn.Dense(8, name="dense1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name="head")(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
        self.dense1 = nnx.Linear(4 * 4 * 6, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = self.conv2(x)
        x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
        return self.head(x)


def _images(seed, n=4):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)), jnp.float32)


def _pair(qat):
    """A Linen and an NNX model with the same weights, both set up for ``qat`` on one batch."""
    linen = LinenNet()
    init_batch = _images(0)
    variables = kure_jax.quantized_init(linen, jax.random.key(0), init_batch, qat=qat)
    model = NNXNet(nnx.Rngs(0))
    nnx.update(model, nnx.State(variables["params"]))
    quantized = qat_nnx.quantize_model(model, init_batch, qat=qat)
    return linen, variables, model, quantized


QATS = [
    QATConfig(weight_bits=4, act_bits=4),
    QATConfig(weight_bits=3, act_bits=8, weight_quantizer="learned_clip",
              act_quantizer="learned_clip", layers=LayerRule(skip_last_dense=True)),
    QATConfig(weight_bits=4, act_bits=4, weight_quantizer="max", act_quantizer="max"),
    QATConfig(weight_bits=2, act_bits=None, weight_quantizer="dorefa",
              layers=LayerRule(skip_first=True)),
    QATConfig(weight_bits=4, act_bits=8, weight_quantizer="matryoshka",
              act_quantizer="matryoshka"),
]


@pytest.mark.parametrize("qat", QATS, ids=lambda q: q.name)
def test_same_logits_and_gradients_as_linen(qat):
    linen, variables, model, quantized = _pair(qat)
    expected_layers = ["conv1", "conv2", "dense1", "head"]
    if qat.layers.skip_first:
        expected_layers.remove("conv1")
    if qat.layers.skip_last_dense:
        expected_layers.remove("head")
    assert quantized == expected_layers

    x, labels = _images(1), jnp.array([0, 1, 2, 1])
    # Both eager: jit may fuse a rounding differently and flip a code that sits on a tie.
    linen_logits = kure_jax.quantized_apply(linen, variables, x, qat=qat)
    nnx_logits = model(x)
    np.testing.assert_allclose(nnx_logits, linen_logits, rtol=1e-5, atol=1e-6)

    def linen_loss(params, quant):
        logits = kure_jax.quantized_apply(linen, {"params": params, "quant": quant}, x, qat=qat)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def nnx_loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    linen_grads = jax.grad(linen_loss, argnums=(0, 1))(variables["params"], variables["quant"])
    nnx_grads = nnx.grad(nnx_loss, argnums=nnx.DiffState(0, (nnx.Param, qat_nnx.QuantParam)))(
        model)
    grads = nnx.to_pure_dict(nnx_grads)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for layer, leaves in linen_grads[0].items():
        for name, value in leaves.items():
            close(grads[layer][name], value)
    for layer, steps in linen_grads[1].items():
        for name, value in steps.items():
            close(grads[layer][name], value)  # the learned steps/clips, QuantParams in NNX
    assert bool(linen_grads[1]) == qat.has_learned_state


def test_quant_params_are_not_in_the_param_state_but_train_with_an_optimizer():
    qat = QATConfig(weight_bits=4, act_bits=4)
    _, _, model, _ = _pair(qat)
    params = nnx.state(model, nnx.Param)
    assert "kernel_step" not in nnx.to_pure_dict(params)["conv2"]
    assert set(nnx.to_pure_dict(nnx.state(model, qat_nnx.QuantParam))["conv2"]) == {
        "kernel_step", "input_step_unsigned"}
    before = float(model.conv2.kernel_step[...])
    optimizer = nnx.Optimizer(model, optax.chain(kure_jax.add_penalty(1.0), optax.adam(1e-2)),
                              wrt=(nnx.Param, qat_nnx.QuantParam))
    x, labels = _images(2), jnp.array([0, 1, 2, 1])

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
        loss_value, grads = nnx.value_and_grad(
            loss, argnums=nnx.DiffState(0, (nnx.Param, qat_nnx.QuantParam)))(model)
        optimizer.update(model, grads)
        return loss_value

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert float(model.conv2.kernel_step[...]) != before


def test_a_missing_quantizer_state_and_bad_models_are_refused():
    qat = QATConfig(weight_bits=4, act_bits=4)
    _, _, model, _ = _pair(qat)
    del model.conv2.kernel_step
    with pytest.raises(ValueError, match="kernel_step"):
        model(_images(1))
    with pytest.raises(ValueError, match="QATConfig"):
        qat_nnx.quantize_model(NNXNet(nnx.Rngs(0)), _images(0), qat={"weight_bits": 4})
    with pytest.raises(ValueError, match="no layer"):
        qat_nnx.quantize_model(nnx.Dropout(0.5), _images(0), qat=qat)
    with pytest.raises(ValueError, match="all zeros"):
        qat_nnx.quantize_model(NNXNet(nnx.Rngs(0)), jnp.zeros((2, 8, 8, 1)), qat=qat)


def test_quantize_model_restores_state_changed_by_its_forward_passes():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))

    model = WithBatchNorm(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    qat_nnx.quantize_model(model, _images(0), qat=QATConfig(weight_bits=4, act_bits=4,
                                                            layers=LayerRule(skip_last_dense=True)))
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert qat_nnx.is_quantized(model.conv) and not qat_nnx.is_quantized(model.head)


class LinenDigits(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(8, (3, 3), name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3), name="conv2")(x)), (2, 2), (2, 2))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class NNXDigits(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.head = nnx.Linear(7 * 7 * 16, 10, rngs=rngs)

    def __call__(self, x):
        pool = lambda y: nnx.max_pool(y, (2, 2), (2, 2))
        x = pool(nnx.relu(self.conv2(pool(nnx.relu(self.conv1(x))))))
        return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.slow
def test_nnx_qat_trains_the_digits_like_the_linen_path():
    """W4A4 LSQ QAT of a small CNN on the shipped MNIST digits, Linen vs NNX, same init."""
    from kure_jax.data import load_mnist5k

    train, test = load_mnist5k("train"), load_mnist5k("test")
    qat = QATConfig(weight_bits=4, act_bits=4)
    steps, batch = 150, 64
    order = np.random.default_rng(0).permutation(len(train.labels))
    batches = [order[i * batch % 4000:][:batch] for i in range(steps)]
    tx = optax.adam(3e-3)

    linen = LinenDigits()
    init_x = jnp.asarray(train.images[:256])
    variables = kure_jax.quantized_init(linen, jax.random.key(0), init_x, qat=qat)
    trainable = {"params": variables["params"], "quant": variables["quant"]}
    opt_state = tx.init(trainable)

    @jax.jit
    def linen_step(trainable, opt_state, x, y):
        def loss(t):
            logits = kure_jax.quantized_apply(linen, t, x, qat=qat)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    model = NNXDigits(nnx.Rngs(0))
    nnx.update(model, nnx.State(variables["params"]))
    qat_nnx.quantize_model(model, init_x, qat=qat)
    wrt = (nnx.Param, qat_nnx.QuantParam)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model))

    for index in batches:
        x, y = jnp.asarray(train.images[index]), jnp.asarray(train.labels[index])
        trainable, opt_state = linen_step(trainable, opt_state, x, y)
        nnx_step(model, optimizer, x, y)

    test_x = jnp.asarray(test.images)
    linen_logits = jax.jit(lambda t: kure_jax.quantized_apply(linen, t, test_x, qat=qat))(
        trainable)
    nnx_logits = nnx.jit(lambda m: m(test_x))(model)
    linen_acc = float(np.mean(np.argmax(linen_logits, -1) == test.labels))
    nnx_acc = float(np.mean(np.argmax(nnx_logits, -1) == test.labels))
    print(f"digits W4A4 LSQ QAT, {steps} steps: linen {linen_acc:.3f}, nnx {nnx_acc:.3f}")
    assert linen_acc > 0.85 and nnx_acc > 0.85, (linen_acc, nnx_acc)
    assert abs(linen_acc - nnx_acc) <= 0.02, (linen_acc, nnx_acc)
