"""4-bit weights and activations (DoReFa) QAT of the Fashion-MNIST ResNet-8, from scratch.

    python train.py --config configs/fashion_mnist_dorefa_w4a4.py \
        --workdir runs/fashion_mnist_dorefa_w4a4

Zhou et al.'s DoReFa (tanh-normalised kernels, activations clipped to [0, 1]) on every conv but
the stem; stem and classifier stay float. Every quantised conv of the ResNet is followed by
BatchNorm, which DoReFa's scale-free kernels need. No KURE; ``fashion_mnist_dorefa_w4a4_kure.py``
adds it. Cost: ``docs/datasets.md``.
"""

import ml_collections

from configs import fashion_mnist_lsq_w4a4


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = fashion_mnist_lsq_w4a4.get_config(variant)
    config.qat.weight_quantizer = "dorefa"
    config.qat.act_quantizer = "dorefa"
    return config
