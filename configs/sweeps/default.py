"""The default robustness sweep (every key of a sweep config, documented).

    python eval.py --checkpoint runs/mnist5k_kure --sweep configs/sweeps/default.py --out runs/eval

Override keys with ``--sweep.KEY=VALUE``, e.g. ``--sweep.weight.bits='(4, 2)'``; an unknown key
fails at start-up naming the closest keys. Each section below is one family of points
(kure_jax/evaluation/families/<section>.py documents it); a section that is absent is off, one
with an empty tuple of bit widths (or pairs) plans nothing. Variants import this file and change
a few fields (tiny.py, multibit.py, runtimes.py). Per checkpoint this sweep evaluates about 200
points (~1.5 minutes for the mnist5k small CNN on 2 CPU cores).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Quantised kernels (and, for W/A, their inputs): "paper" = every conv/dense but the first
    # conv and the classifier (the KURE paper keeps those two in full precision); "kernels" = all.
    config.layers = "paper"
    config.eval_batch_size = 1000
    # Points per vmapped chunk in the step-ratio and stochastic-seed sweeps. 1 = one compiled
    # lax.map loop (fastest on CPU, where a vmapped conv over per-point kernels is a slow grouped
    # conv); on a GPU/TPU try 8-16.
    config.map_chunk = 1

    # The float model: one point, the reference of every table (no keys).
    config.fp = ml_collections.ConfigDict()

    # Weight-only PTQ: every named quantizer (kure_jax.QuantPolicy fields but bits) at every bits.
    config.weight = ml_collections.ConfigDict()
    config.weight.bits = (8, 6, 5, 4, 3, 2)
    config.weight.quantizers = ml_collections.ConfigDict({
        "max": {},  # per-tensor, symmetric, max-abs clip, round to nearest (the paper's PTQ)
        "per_channel": {"axis": -1},  # one step per output channel
        "asym": {"symmetric": False},  # affine range [min, max] with an integer zero point
        "mse": {"clip": "mse"},  # clip minimising the squared quantisation error
        "aciq": {"clip": "aciq"},  # Gaussian ACIQ clip
        "percentile": {"clip": "percentile", "percentile": 99.9},
        "stochastic": {"rounding": "stochastic"},  # one point per seed
        "floor": {"rounding": "floor"},  # truncation
        "pow2": {"pow2_step": True},  # step rounded to a power of two
    })
    config.weight.stochastic_seeds = 4

    # Weight + activation PTQ with static activation steps calibrated on training images.
    config.weight_act = ml_collections.ConfigDict()
    config.weight_act.pairs = ((8, 8), (6, 6), (5, 5), (4, 4), (3, 3))
    config.weight_act.weight_quantizer = "max"  # a name in weight.quantizers
    config.weight_act.act_clip = "mse"  # max | mse | aciq | aciq_laplace | percentile
    config.weight_act.act_percentile = 99.99
    config.weight_act.calibration_images = 512
    config.weight_act.calibration_seed = 0

    # Step-size perturbation: every layer's step x r for r in linspace(start, stop, num),
    # evaluated as one compiled program per bit width.
    config.step_ratio = ml_collections.ConfigDict()
    config.step_ratio.bits = (4, 3)
    config.step_ratio.quantizer = "max"
    config.step_ratio.start = 0.7
    config.step_ratio.stop = 1.3
    config.step_ratio.num = 61

    # QAT checkpoints only: re-quantise the float shadow weights with the checkpoint's own
    # quantizer at these bit widths (activations as trained); sweep its learned steps x r.
    config.qat = ml_collections.ConfigDict()
    config.qat.bits = (8, 6, 5, 4, 3, 2)
    config.qat.step_ratio = True

    # One model at every width (off here; configs/sweeps/multibit.py turns it on): weight-only
    # asymmetric min-max codes at each width, the float kernels re-quantised and the top bits
    # of their nest_bits-bit codes (Matryoshka slicing).
    config.nested = ml_collections.ConfigDict()
    config.nested.bits = ()
    config.nested.nest_bits = 8
    config.nested.per_channel = True  # one range per output channel, as "matryoshka" QAT

    # Accelerator data types, weight-only (off here): presets of kure_jax.quant.formats such as
    # "fp8_e4m3", "mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "nvfp4", "int4_block32", "nf4".
    config.formats = ml_collections.ConfigDict()
    config.formats.names = ()

    config.report = ml_collections.ConfigDict()
    config.report.histogram_layers = 3  # weight histograms of the first N quantised layers
    config.report.plots = True

    # Real integer runtimes (off here; configs/sweeps/runtimes.py turns them on): names such as
    # "litert/int8", "litert/16x8", "ort/int8_per_channel_minmax", "ort/int4_per_channel_minmax"
    # (kure_jax/evaluation/families/runtime_schemes.py), calibrated on the weight_act images.
    config.runtimes = ml_collections.ConfigDict()
    config.runtimes.schemes = ()
    config.runtimes.litert_batch_size = 100  # LiteRT models have a fixed batch size
    return config
