"""What the paper's ImageNet recipes share; each ``imagenet_*.py`` recipe sets ``model`` and
changes a few fields. Not a recipe by itself (no model).

ImageNet through TFDS (``imagenet2012``): put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in a manual dir and pass ``--config.dataset_options.manual_dir=DIR``
(and ``data_dir`` for the prepared data). 1000 classes, batch 256 (eval 500), 90 epochs, SGD
momentum 0.9, weight decay 1e-4, lr 1e-3 divided by 10 at epochs 30 and 60, K_T = 1.8, lambda =
1.0 on every conv but the first (not the classifier); evaluation once per epoch, a checkpoint
every 1000 steps. The paper fine-tunes torchvision-pretrained weights; kure_jax cannot load
those yet, so the recipes record the paper's hyperparameters and train from scratch.
"""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config(variant)
    config.dataset = "imagenet2012"
    config.dataset_options.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset_options.manual_dir = ml_collections.config_dict.placeholder(str)
    config.num_classes = 1000
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 90.0
    config.learning_rate = 1e-3
    config.log_every_steps = 100
    config.eval_every_steps = 0  # once per epoch
    config.checkpoint_every_steps = 1000
    return config
