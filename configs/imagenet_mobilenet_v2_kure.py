r"""The paper's MobileNet-V2 KURE fine-tune: batch 256, ~83 epochs, lr 1e-3 /10 every 30.

    python -m kure_jax.models.convert --arch mobilenet_v2 --weights mobilenet_v2.pth \
        --out runs/tv_mobilenet_v2
    python train.py --config configs/imagenet_mobilenet_v2_kure.py \
        --config.init_from=runs/tv_mobilenet_v2 --workdir runs/imagenet_mobilenet_v2_kure

From torchvision's pretrained MobileNet-V2 (``init_from`` required, see ``imagenet_base.py``);
otherwise as ``imagenet_resnet18_kure.py``.
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
