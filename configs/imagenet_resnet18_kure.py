"""The paper's ResNet-18 KURE recipe on ImageNet (PTQ-robust model; PAPER.md "Recipes").

    python train.py --config configs/imagenet_resnet18_kure.py --workdir runs/imagenet_resnet18_kure

SGD momentum 0.9, weight decay 1e-4, lr 1e-3 divided by 10 every 30 epochs, batch 256,
90 epochs, K_T = 1.8, lambda = 1.0 on every conv but the first (not the classifier).
The paper fine-tunes torchvision-pretrained weights; kure_jax cannot load those yet,
so this recipe records the paper's hyperparameters. ImageNet is read through TFDS:
put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a manual dir and pass
``--config.dataset_options.manual_dir=DIR`` (and ``data_dir`` for the prepared data).
"""

import pathlib
import runpy

import ml_collections

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist5k_kure.py")))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = _default["get_config"](variant)
    config.model = "resnet18"
    config.model_options = ml_collections.ConfigDict()
    config.dataset_options = ml_collections.ConfigDict()
    config.dataset_options.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset_options.manual_dir = ml_collections.config_dict.placeholder(str)
    config.dataset = "imagenet2012"
    config.num_classes = 1000
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 90.0
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.schedule.name = "step"
    config.schedule.milestones = (30, 60)
    config.schedule.gamma = 0.1
    config.schedule.warmup_epochs = 0.0
    config.kure.lambda_ = 1.0
    config.kure.target = 1.8
    config.kure.selection = "paper"
    config.kure.reduction = "mean"
    config.log_every_steps = 100
    config.eval_every_steps = 0  # once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    config.keep_best = 1
    return config
