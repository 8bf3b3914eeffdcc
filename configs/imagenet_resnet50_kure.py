"""The paper's ResNet-50 KURE recipe on ImageNet: batch 128, 50 epochs, lr 1e-3 /10 at 30.

    python train.py --config configs/imagenet_resnet50_kure.py --workdir runs/imagenet_resnet50_kure

Otherwise as ``imagenet_resnet18_kure.py`` (same caveat: no torchvision-pretrained weights yet, so
training starts from scratch; ImageNet comes from TFDS with a manual dir).
"""

import ml_collections

from configs import imagenet_base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = imagenet_base.get_config(variant)
    config.model = "resnet50"
    config.batch_size = 128
    config.num_epochs = 50.0
    config.schedule.milestones = (30,)
    return config
