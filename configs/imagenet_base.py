r"""What the paper's ImageNet fine-tune recipes share (PAPER.md "Recipes"); each ``imagenet_*.py``
recipe sets ``model`` and changes a few fields. Not a recipe by itself (no model).

The paper fine-tunes torchvision-pretrained weights, so every recipe needs ``init_from``, a
required placeholder (``None`` here) that the user sets: convert the weights once (nothing is
downloaded; see README "ImageNet: pretrained import and fine-tune")::

    python -m kure_jax.models.convert --arch resnet18 --weights resnet18.pth --out runs/tv_resnet18
    python train.py --config configs/imagenet_resnet18_kure.py --config.init_from=runs/tv_resnet18 \
        --config.dataset_options.manual_dir=DIR --config.dataset_options.data_dir=DIR2

Without it the run starts from a random init, which these learning rates (1e-3, 1e-4) do not
train to the paper's accuracy. ImageNet comes through TFDS (``imagenet2012``): put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ``manual_dir``; the first run prepares
them into ``data_dir``, and a missing file fails at start-up saying which and where.

Shared: 1000 classes, SGD momentum 0.9, weight decay 1e-4, lr 1e-3 divided by 10 every 30
epochs (milestones 30, 60), batch 256 (eval 500), 90 epochs, K_T = 1.8, lambda = 1.0 on every
conv but the first (not the classifier); evaluation once per epoch, a checkpoint every 1000
steps.
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
