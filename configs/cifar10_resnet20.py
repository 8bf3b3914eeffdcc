"""ResNet-20 with KURE on CIFAR-10 (He et al. 2016 recipe: 160 epochs, lr 0.1 /10 at 80, 120).

    python train.py --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20

Reads CIFAR-10 through TFDS (``--config.dataset_options.data_dir=DIR`` for a non-default
TFDS directory); a missing dataset fails at start-up with the ``tfds build`` command to run.
"""

import pathlib
import runpy

import ml_collections

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist5k_kure.py")))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = _default["get_config"](variant)
    config.model = "resnet20"
    config.model_options = ml_collections.ConfigDict()
    config.dataset_options = ml_collections.ConfigDict()
    config.dataset_options.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset = "cifar10"
    config.num_classes = 10
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 160.0
    config.optimizer.nesterov = False
    config.learning_rate = 0.1
    config.weight_decay = 1e-4
    config.schedule.name = "step"
    config.schedule.milestones = (80, 120)
    config.schedule.gamma = 0.1
    config.kure.lambda_ = 1.0
    config.kure.selection = "paper"
    config.log_every_steps = 100
    return config
