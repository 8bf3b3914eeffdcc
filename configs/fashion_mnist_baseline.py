"""Baseline for ``fashion_mnist_kure.py``: the same ResNet-8 run without KURE (lambda = 0).

    python train.py --config configs/fashion_mnist_baseline.py --workdir runs/fashion_mnist_baseline

Cost as ``fashion_mnist_kure.py`` (``docs/datasets.md``).
"""

import ml_collections

from configs import fashion_mnist_kure


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = fashion_mnist_kure.get_config(variant)
    config.kure.lambda_ = 0.0  # the penalty is not computed; kurtosis is still logged
    return config
