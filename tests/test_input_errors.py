"""Bad inputs a user is likely to pass fail at the call with a message naming the problem.

Each case once failed late (an AttributeError/TypeError deep inside JAX, or a silent NaN); the
per-module test files check each function's documented errors, this one the cross-cutting ones.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kure_jax
from kure_jax import theory
from kure_jax.quant.ops import integer_range, lsq_init_scale

X = jnp.array([0.26, -1.0, 3.0])
R = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)

CASES = {
    "non-bool narrow_range": (lambda: integer_range(4, signed=False, narrow_range=2),
                              "narrow_range must be True or False"),
    "non-bool signed": (lambda: kure_jax.fake_quant(X, 0.5, bits=4, signed="no"),
                        "signed must be True or False"),
    "int as key": (lambda: kure_jax.fake_quant(X, 0.5, bits=4, rounding="stochastic", key=0),
                   "key must be a PRNG key"),
    "int as key, kernels' noise": (lambda: kure_jax.fake_quant(X, 0.5, bits=4,
                                                               rounding="stochastic", key=0,
                                                               impl="jnp", noise="hash"),
                                   "key must be a PRNG key"),
    "dict as policy": (lambda: kure_jax.quantize(X, {"bits": 4}), "policy must be a QuantPolicy"),
    "dict as QATConfig": (lambda: kure_jax.quantized_init(nn.Dense(2), jax.random.key(0), R,
                                                          qat={"weight_bits": 4}),
                          "qat must be a QATConfig"),
    "int block_shape": (lambda: kure_jax.fake_quant(R, 0.5, bits=4, impl="pallas",
                                                    block_shape=8),
                        "block_shape must be a pair"),
    "bool step in theory": (lambda: theory.quantization_mse("normal", bits=4, step=True),
                            "step must be a finite number"),
    "axis on a scalar": (lambda: kure_jax.quant.compute_step(jnp.float32(2.0),
                                                       kure_jax.QuantPolicy(axis=0)),
                         "a scalar has no axes"),
    "repeated axis, PTQ": (lambda: kure_jax.quantize_params({"a": {"kernel": R}},
                                                            kure_jax.QuantPolicy(axis=(1, -1))),
                           "leaf 'a/kernel'.*names the same axis twice"),
    "repeated axis, kernel": (lambda: kure_jax.quantize(R, kure_jax.QuantPolicy(axis=(1, -1)),
                                                        impl="pallas"),
                              "names the same axis twice"),
    "empty leaf, PTQ": (lambda: kure_jax.quantize_params({"kernel": jnp.zeros((0, 3))}),
                        "'kernel' is empty"),
    "empty tensor, compute_step": (lambda: kure_jax.quant.compute_step(jnp.zeros((0,)),
                                                                 kure_jax.QuantPolicy()),
                                   "non-empty"),
    "empty tensor, DoReFa": (lambda: kure_jax.quant.dorefa_weight(jnp.zeros((0,)), bits=4),
                             "non-empty"),
    "empty tensor, LSQ init": (lambda: lsq_init_scale(jnp.zeros((0,)), bits=4),
                               "non-empty"),
    "axis out of range, LSQ init": (lambda: lsq_init_scale(jnp.ones((2, 3)), bits=4,
                                                                    axis=5),
                                    "out of range"),
    "NaN in x, PTQ": (lambda: kure_jax.quantize(jnp.array([jnp.nan, 1.0]), kure_jax.QuantPolicy()),
                      "needs finite values; x has 1 NaN/inf"),
    "inf in x, PTQ": (lambda: kure_jax.quantize(jnp.array([jnp.inf, 1.0, 0.5]),
                                                kure_jax.QuantPolicy()),
                      "needs finite values"),
    "NaN zero point": (lambda: kure_jax.fake_quant(X, 0.5, bits=4, zero_point=jnp.nan),
                       "zero_point must be finite"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_at_the_call(case):
    call, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_valid_variants_still_pass():
    assert integer_range(4, signed=np.bool_(False)) == (0, 15)
    raw_key = jax.random.PRNGKey(0)  # legacy uint32[2] keys are keys too
    assert kure_jax.fake_quant(X, 0.5, bits=4, rounding="stochastic", key=raw_key).shape == (3,)
    keys = jax.random.split(jax.random.key(0), 2)  # and keys under vmap
    out = jax.vmap(lambda k: kure_jax.fake_quant(X, 0.5, bits=4, rounding="stochastic", key=k))(
        keys)
    assert out.shape == (2, 3)
    assert lsq_init_scale(jnp.ones((2, 3)), bits=4, axis=(0,)).shape == (1, 3)
