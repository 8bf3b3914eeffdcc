"""Matryoshka Quantization on the shipped digits: one model whose int8 codes hold int4 and int2.

    python train.py --config configs/mnist5k_matryoshka.py --workdir runs/mnist5k_matryoshka

Weight-only multi-bit QAT (Nair et al., ICML 2025): every step runs the model with its kernels'
per-channel min-max int8 codes sliced to their top 8, 4 and 2 bits (the ``"matryoshka"``
quantizer, ``kure_jax.quant.nested``) and sums the three losses; activations stay float.
BatchNorm is shared by the widths. ``mnist5k_matryoshka_kure.py`` adds KURE.
"""

import ml_collections

from configs import mnist5k_kure


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = mnist5k_kure.get_config(variant)
    config.kure.lambda_ = 0.0
    config.num_epochs = 5.0  # three forward passes per step
    config.qat.enabled = True
    config.qat.weight_quantizer = "matryoshka"
    config.qat.weight_bits = 4  # replaced by each width of qat.bits
    config.qat.act_bits = None
    config.qat.bits = (8, 4, 2)
    config.qat.multibit = "sum"
    config.qat.bn_per_bits = False
    return config
