r"""KURE + 4-bit weights / 4-bit activations quantization-aware training on mnist5k.

    python train.py --config configs/mnist5k_qat_w4a4.py --workdir runs/mnist5k_qat_w4a4

Esser et al.'s LSQ (learned step, gradient scaling) for kernels and conv/dense inputs;
the stem conv and the classifier stay float, as in the paper. KURE acts on the float
shadow weights. ``--config.qat.weight_quantizer=dorefa`` or ``=learned_clip`` (the
KURE reference's "LSQ") switch quantizers. DoReFa kernels are scale-free (always in
[-1, 1]), so DoReFa needs a BatchNorm after every quantised layer, including the
``hidden`` dense layer: without it the run collapses (an outlier weight, kurtosis ~5e4)::

    python train.py --config configs/mnist5k_qat_w4a4.py --workdir runs/mnist5k_dorefa \
        --config.qat.weight_quantizer=dorefa --config.qat.act_quantizer=dorefa \
        --config.model_options.hidden_norm=True

Trains from scratch by default (97.0% test accuracy). As in the paper, QAT usually
fine-tunes a float model (97.7% after 3 epochs):

    python train.py --config configs/mnist5k_kure.py --workdir runs/mnist5k_kure
    python train.py --config configs/mnist5k_qat_w4a4.py --workdir runs/mnist5k_qat_ft \
        --config.init_from=runs/mnist5k_kure --config.learning_rate=0.005 --config.num_epochs=3
"""

import ml_collections

from configs import mnist5k_kure


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = mnist5k_kure.get_config(variant)
    config.qat.enabled = True
    config.qat.weight_bits = 4
    config.qat.act_bits = 4
    config.qat.weight_quantizer = "lsq"
    config.qat.act_quantizer = "lsq"
    config.learning_rate = 0.05  # from scratch, the quantised net needs a larger step
    # small_cnn's BatchNorm after `hidden` (off, as in the float models); DoReFa needs it.
    config.model_options.hidden_norm = False
    return config
