"""Matryoshka Quantization with KURE (lambda 1 on the paper's layers) on the shipped digits.

    python train.py --config configs/mnist5k_matryoshka_kure.py --workdir runs/mnist5k_mat_kure
"""

import ml_collections

from configs import mnist5k_matryoshka


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = mnist5k_matryoshka.get_config(variant)
    config.kure.lambda_ = 1.0
    return config
