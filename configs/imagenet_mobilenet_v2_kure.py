r"""The paper's MobileNet-V2 KURE recipe on ImageNet: batch 256, ~83 epochs, lr 1e-3 /10 per 30.

    python train.py --config configs/imagenet_mobilenet_v2_kure.py \
        --workdir runs/imagenet_mobilenet_v2_kure

Otherwise as ``imagenet_resnet18_kure.py`` (same caveat: no torchvision-pretrained weights yet, so
training starts from scratch; ImageNet comes from TFDS with a manual dir).
"""

import ml_collections

from configs import imagenet_base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = imagenet_base.get_config(variant)
    config.model = "mobilenet_v2"
    config.batch_size = 256
    config.num_epochs = 83.0
    config.schedule.milestones = (30, 60)
    return config
