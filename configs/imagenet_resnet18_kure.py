r"""The paper's ResNet-18 KURE fine-tune (PTQ-robust model; PAPER.md "Recipes").

    python -m kure_jax.models.convert --arch resnet18 --weights resnet18.pth --out runs/tv_resnet18
    python train.py --config configs/imagenet_resnet18_kure.py --config.init_from=runs/tv_resnet18 \
        --workdir runs/imagenet_resnet18_kure

From torchvision's pretrained ResNet-18 (``init_from``, required: see ``imagenet_base.py``):
SGD momentum 0.9, weight decay 1e-4, lr 1e-3 divided by 10 every 30 epochs, batch 256,
90 epochs (the paper: ~83-90), K_T = 1.8, lambda = 1.0 on every conv but the first (not the
classifier).
"""

import ml_collections

from configs import imagenet_base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = imagenet_base.get_config(variant)
    config.model = "resnet18"
    return config
