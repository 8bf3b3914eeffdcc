"""Default: a small CNN with KURE on the 5,000 shipped MNIST digits (CPU, 1-2 minutes).

    python train.py --config configs/mnist5k_kure.py --workdir runs/mnist5k_kure

Measured on 2 shared CPU cores: 98.3% test accuracy after the 10 epochs (310 steps,
80-140 s wall), and the regularised kernels (conv1, conv2, hidden) end with kurtosis
1.81-1.86; without KURE (``mnist5k_baseline.py``: also 98.3%) at 2.5-3.0.

``configs/mnist5k_kure.py:tiny`` is a seconds-long variant for tests and smoke runs.
Override any field on the command line, e.g. ``--config.num_epochs=2`` or
``--config.kure.lambda_=0.1``; a misspelt field fails at start-up.

The fields and their defaults are in ``base.py``; this recipe is a delta on it, and
``mnist5k_baseline.py`` / ``mnist5k_qat_w4a4.py`` are deltas on this one.
"""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The default config; ``variant="tiny"`` (``--config configs/mnist5k_kure.py:tiny``)
    shrinks model, batch and run length to seconds, for tests and smoke runs."""
    config = base.get_config(variant)
    config.model = "small_cnn"
    config.dataset = "mnist5k"
    config.dataset_options.max_shift = 2  # random +-2 pixel translations of training digits
    config.num_classes = 10
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 10.0
    config.optimizer.nesterov = True
    config.learning_rate = 0.02
    config.weight_decay = 5e-4
    config.schedule.name = "cosine"
    if variant == "tiny":
        config.model_options.features = (8, 16)
        config.model_options.hidden = 32
        config.batch_size = 32
        config.eval_batch_size = 200
    return config
