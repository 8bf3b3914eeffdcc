"""Baseline for ``mnist5k_kure.py``: the same run without KURE (lambda = 0).

    python train.py --config configs/mnist5k_baseline.py --workdir runs/mnist5k_baseline
"""

import pathlib
import runpy

import ml_collections

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist5k_kure.py")))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = _default["get_config"](variant)
    config.kure.lambda_ = 0.0  # the penalty is not computed; kurtosis is still logged
    return config
