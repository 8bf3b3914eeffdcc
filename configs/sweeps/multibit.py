"""One model for every bit width: the sweep of ``scripts/multibit_compare.py`` (issue #12).

    python eval.py --checkpoint runs/multibit/matryoshka_s0 --sweep configs/sweeps/multibit.py \\
        --out runs/multibit/eval

The default sweep's sections at the widths 8, 6, 4, 3, 2 with two weight quantizers (per-tensor
max-abs, per-channel), the step-ratio rows at W4 and W3, and the ``nested`` section on: every
checkpoint re-quantised to min-max codes and sliced from its int8 codes at each width. Multi-bit
QAT checkpoints also get one point per trained width as trained and their own quantizers at
the other widths (``qat.bits``). About 150 points per checkpoint (~1 minute for the mnist5k
small CNN on 2 CPU cores).
"""

import ml_collections

from configs.sweeps import default

BITS = (8, 6, 4, 3, 2)


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.weight.bits = BITS
    config.weight.quantizers = ml_collections.ConfigDict({
        "max": {},
        "per_channel": {"axis": -1},
    })
    config.weight_act.pairs = ((8, 8), (4, 4))
    config.qat.bits = BITS
    config.nested.bits = BITS
    return config
