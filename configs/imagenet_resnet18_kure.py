"""The paper's ResNet-18 KURE recipe on ImageNet (PTQ-robust model; PAPER.md "Recipes").

    python train.py --config configs/imagenet_resnet18_kure.py --workdir runs/imagenet_resnet18_kure

SGD momentum 0.9, weight decay 1e-4, lr 1e-3 divided by 10 every 30 epochs, batch 256,
90 epochs, K_T = 1.8, lambda = 1.0 on every conv but the first (not the classifier).
The paper fine-tunes torchvision-pretrained weights; kure_jax cannot load those yet,
so this recipe records the paper's hyperparameters. ImageNet is read through TFDS:
put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a manual dir and pass
``--config.dataset_options.manual_dir=DIR`` (and ``data_dir`` for the prepared data).
"""

import ml_collections

from configs import imagenet_base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = imagenet_base.get_config(variant)
    config.model = "resnet18"
    return config
