"""ResNet-20 with KURE on CIFAR-10 (He et al. 2016 recipe: 160 epochs, lr 0.1 /10 at 80, 120).

    python train.py --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20

Reads CIFAR-10 through TFDS (``--config.dataset_options.data_dir=DIR`` for a non-default
TFDS directory). Nothing is downloaded unless ``--config.dataset_options.download=True``: a
dataset missing from ``data_dir`` fails at start-up, in seconds, with the ``tfds build`` command
to run (on a machine with internet access) and where to put the result, instead of retrying a
download for minutes on a machine without internet.
"""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config(variant)
    config.model = "resnet20"
    config.dataset = "cifar10"
    config.dataset_options.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset_options.download = False  # True: let TFDS download CIFAR-10 into data_dir
    config.num_classes = 10
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 160.0
    config.learning_rate = 0.1
    config.schedule.milestones = (80, 120)
    config.log_every_steps = 100
    return config
