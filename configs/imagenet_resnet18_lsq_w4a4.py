r"""The paper's ResNet-18 "LSQ" W4A4 QAT experiment with KURE on ImageNet.

    python train.py --config configs/imagenet_resnet18_lsq_w4a4.py \
        --config.init_from=runs/tv_resnet18 --workdir runs/imagenet_resnet18_lsq_w4a4

What the KURE reference calls LSQ is a learned clip per tensor (``"learned_clip"``:
step ``2 alpha / (2^b - 1)`` for weights, ``alpha / (2^b - 1)`` for ReLU outputs), not
Esser et al.'s LSQ; this config uses it so the experiment matches the paper. Pass
``--config.qat.weight_quantizer=lsq --config.qat.act_quantizer=lsq`` for Esser et
al.'s learned step size. The paper gives no separate hyperparameters for this run;
these are the DoReFa W4A4 recipe's (``imagenet_resnet18_dorefa_w4a4.py``), including the
required ``--config.init_from`` (torchvision's ResNet-18 converted with ``python -m
kure_jax.models.convert``).
"""

import ml_collections

from configs import imagenet_resnet18_dorefa_w4a4


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = imagenet_resnet18_dorefa_w4a4.get_config(variant)
    config.qat.weight_quantizer = "learned_clip"
    config.qat.act_quantizer = "learned_clip"
    return config
