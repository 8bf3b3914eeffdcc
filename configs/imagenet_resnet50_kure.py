r"""The paper's ResNet-50 KURE fine-tune: batch 128, 50 epochs, lr 1e-3 /10 at epoch 30.

    python -m kure_jax.models.convert --arch resnet50 --weights resnet50.pth --out runs/tv_resnet50
    python train.py --config configs/imagenet_resnet50_kure.py --config.init_from=runs/tv_resnet50 \
        --workdir runs/imagenet_resnet50_kure

From torchvision's pretrained ResNet-50 (v1.5, the stride on the 3x3 conv; ``init_from``
required, see ``imagenet_base.py``); otherwise as ``imagenet_resnet18_kure.py``.
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
