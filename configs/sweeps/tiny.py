"""A seconds-long sweep for tests and smoke runs: a few points of every section.

    python eval.py --checkpoint runs/tiny --sweep configs/sweeps/tiny.py --out runs/eval_tiny
"""

import ml_collections

from configs.sweeps import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.eval_batch_size = 500
    config.weight.bits = (16, 4, 2)
    config.weight.quantizers = ml_collections.ConfigDict({
        "max": {},
        "per_channel": {"axis": -1},
    })
    config.weight_act.pairs = ((8, 8), (4, 4))
    config.weight_act.act_clip = "max"
    config.weight_act.calibration_images = 64
    config.step_ratio.bits = (3,)
    config.step_ratio.num = 5
    config.qat.bits = (4, 3)
    config.report.histogram_layers = 2
    return config
