"""LSQ W4A4 QAT of the Fashion-MNIST ResNet-8 with KURE (lambda 1, K_T 1.8, the paper's layers).

    python train.py --config configs/fashion_mnist_lsq_w4a4_kure.py \
        --workdir runs/fashion_mnist_lsq_w4a4_kure

``fashion_mnist_lsq_w4a4.py`` with the penalty on the float shadow weights. Cost:
``docs/datasets.md``.
"""

import ml_collections

from configs import fashion_mnist_lsq_w4a4


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = fashion_mnist_lsq_w4a4.get_config(variant)
    config.kure.lambda_ = 1.0
    return config
