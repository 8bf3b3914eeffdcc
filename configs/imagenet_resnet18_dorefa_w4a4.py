r"""The paper's ResNet-18 DoReFa W4A4 QAT fine-tune with KURE on ImageNet.

    python -m kure_jax.models.convert --arch resnet18 --weights resnet18.pth --out runs/tv_resnet18
    python train.py --config configs/imagenet_resnet18_dorefa_w4a4.py \
        --config.init_from=runs/tv_resnet18 --workdir runs/imagenet_resnet18_dorefa_w4a4

From torchvision's pretrained ResNet-18 (``init_from`` required, see ``imagenet_base.py``;
a float KURE run of ``imagenet_resnet18_kure.py`` works too): lr 1e-4 divided by 10 at
epochs 30, 60, 85 and 95 (as listed in the paper; training stops at 80, so the last two never
apply), batch 256, 80 epochs, SGD momentum 0.9, weight decay 1e-4, K_T = 1.8, lambda = 1.0 on
the float shadow weights; the stem conv and the classifier stay float.
"""

import ml_collections

from configs import imagenet_resnet18_kure


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = imagenet_resnet18_kure.get_config(variant)
    config.num_epochs = 80.0
    config.learning_rate = 1e-4
    config.schedule.milestones = (30, 60, 85, 95)
    config.qat.enabled = True
    config.qat.weight_bits = 4
    config.qat.act_bits = 4
    config.qat.weight_quantizer = "dorefa"
    config.qat.act_quantizer = "dorefa"
    config.qat.layers = "paper"
    return config
