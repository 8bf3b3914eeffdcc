"""Baseline for ``mnist5k_kure.py``: the same run without KURE (lambda = 0).

    python train.py --config configs/mnist5k_baseline.py --workdir runs/mnist5k_baseline
"""

import ml_collections

from configs import mnist5k_kure


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = mnist5k_kure.get_config(variant)
    config.kure.lambda_ = 0.0  # the penalty is not computed; kurtosis is still logged
    return config
