"""The default sweep plus real integer runtimes: LiteRT and ONNX Runtime beside kure_jax's PTQ.

    python eval.py --checkpoint base=runs/x --checkpoint kure=runs/y \\
        --sweep configs/sweeps/runtimes.py --out runs/eval_runtimes

Every ``runtimes.schemes`` name converts the float model (BatchNorm statistics included) and runs
it in the runtime on the test split, calibrated on the ``weight_act`` calibration images
(kure_jax/evaluation/families/runtimes.py; the names are described in
kure_jax/evaluation/families/runtime_schemes.py). The packages: ``pip install 'kure_jax[runtimes]'``
(tensorflow-cpu, ai-edge-litert, jax2onnx, onnx, onnxruntime); a missing one stops eval.py at
start-up with its name, a conversion the toolchain refuses is recorded as a failed point.

Compared with default.py: the W/A section uses per-channel weights and max-calibrated
activations (the runtimes' int8 scheme: per-channel symmetric weights, min/max activation
ranges) and adds the pairs W8A16 and W4A8, so each runtime column has kure_jax's closest
emulation beside it in report.md; the weight-only section keeps every quantizer at fewer bit
widths and the step-ratio grid is coarser (``make demo-runtimes`` stays near 10 minutes).

Not included: qwix (Google's JAX quantisation library, not a kure_jax dependency). Tried outside
the project's environment (qwix 0.1.8, ``pip install --no-deps --target``) on ``SmallCNN``:
``PtqProvider`` with int8 weights and dynamic int8 activations runs, but weight-only int8 and
int4 weights with int8 activations are refused by its ``conv_general_dilated`` ("requires same
act_qtype and weight_qtype"), and it runs in XLA, not in an integer runtime; so no backend here.
"""

import ml_collections

from configs.sweeps import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.weight.bits = (8, 4, 3, 2)
    config.weight_act.pairs = ((8, 16), (8, 8), (4, 8), (4, 4))
    config.weight_act.weight_quantizer = "per_channel"
    config.weight_act.act_clip = "max"
    config.step_ratio.num = 31

    config.runtimes = ml_collections.ConfigDict()
    config.runtimes.schemes = (
        "litert/int8",  # full-integer int8 (per-channel weights, asymmetric activations)
        "litert/16x8",  # int16 activations, int8 weights
        "ort/int8_per_tensor_minmax",  # ORT quantize_static (QDQ), one weight step per tensor
        "ort/int8_per_channel_minmax",
        "ort/int8_per_channel_entropy",  # ORT's activation calibrators
        "ort/int8_per_channel_percentile",
        "ort/int4_per_tensor_minmax",  # QInt4 weights, int8 activations
        "ort/int4_per_channel_minmax",
    )
    config.runtimes.litert_batch_size = 100  # LiteRT models have a fixed batch size
    return config
