"""4-bit weights and activations (LSQ) QAT of the Fashion-MNIST ResNet-8, from scratch, no KURE.

    python train.py --config configs/fashion_mnist_lsq_w4a4.py --workdir runs/fashion_mnist_lsq_w4a4

Esser et al.'s LSQ (learned step with gradient scaling) for the kernels and inputs of every conv
but the stem; the stem conv and the classifier stay float, as in the paper.
``fashion_mnist_lsq_w4a4_kure.py`` adds KURE. Cost: a QAT step costs about 1.6x a float one
(40-step train.py runs timed with /usr/bin/time: 118 vs 93 CPU s including start-up and one
evaluation), so a run is about 1,100 CPU s: about 10 minutes on 2 idle cores (``docs/datasets.md``).
"""

import ml_collections

from configs import fashion_mnist_baseline


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = fashion_mnist_baseline.get_config(variant)
    config.qat.enabled = True
    config.qat.weight_bits = 4
    config.qat.act_bits = 4
    config.qat.weight_quantizer = "lsq"
    config.qat.act_quantizer = "lsq"
    return config
