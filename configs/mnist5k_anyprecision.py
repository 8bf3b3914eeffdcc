"""Any-Precision DNN on the shipped digits: one model trained at W8A8, W4A4 and W2A2 at once.

    python train.py --config configs/mnist5k_anyprecision.py --workdir runs/mnist5k_anyprecision

Yu et al. (AAAI 2021): DoReFa weights and activations, every step sums the losses of the three
widths over shared float weights, and BatchNorm keeps running statistics per width (switchable
BatchNorm, ``qat.bn_per_bits``; saved in the checkpoint as ``batch_stats/w8``, ...). DoReFa needs
a normalisation after every quantised layer, hence ``hidden_norm``.
"""

import ml_collections

from configs import mnist5k_kure


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = mnist5k_kure.get_config(variant)
    config.kure.lambda_ = 0.0
    config.num_epochs = 5.0  # three forward passes per step
    config.qat.enabled = True
    config.qat.weight_quantizer = "dorefa"
    config.qat.act_quantizer = "dorefa"
    config.qat.weight_bits = 4  # replaced by each width of qat.bits
    config.qat.act_bits = 4
    config.qat.bits = (8, 4, 2)
    config.qat.multibit = "sum"
    config.qat.bn_per_bits = True
    config.model_options.hidden_norm = True
    return config
