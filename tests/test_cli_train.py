"""train.py start-up errors: one ``error:`` line on stderr, exit code 2, no traceback, fast.

The missing-data checks do not depend on the machine being offline: the CIFAR-10 recipe does not
download unless ``dataset_options.download`` is set, and ImageNet needs its manual tars, so an
empty ``data_dir`` fails before any network access either way.
"""

import os
import subprocess
import sys
import time

import pytest
from _training_helpers import ROOT

# Every test starts train.py in a new process.
pytestmark = pytest.mark.slow

CONFIGS = ROOT / "configs"


def _train(*args, cwd):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=180,
    )
    return result, time.monotonic() - start


def _error_line(result):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("args, expected", [
    # No --config: the default file's fields (ml_collections applies these at import).
    (["--config.nonexistent=1"], "unknown config field config.nonexistent"),
    (["--config.kure.lambd=0.5"], "config.kure.lambd (in --config.kure.lambd); closest: "
                                  "config.kure.lambda_"),
    ([f"--config={CONFIGS / 'mnist5k_kure.py'}:tiny", "--config.num_epoch=2"],
     "closest: config.num_epochs"),
    ([f"--config={CONFIGS / 'mnist5k_kure.py'}", "--config.num_epochs=abc"],
     "could not convert string to float: 'abc'"),
    ([f"--config={CONFIGS / 'no_such.py'}"], "no_such.py does not exist"),
])
def test_flag_errors(tmp_path, args, expected):
    result, _ = _train(*args, cwd=tmp_path)
    assert expected in _error_line(result)
    assert not (tmp_path / "runs").exists()


def test_cifar10_not_on_disk_fails_fast_with_what_to_do(tmp_path):
    data_dir = tmp_path / "tfds"
    result, seconds = _train(f"--config={CONFIGS / 'cifar10_resnet20.py'}",
                             f"--config.dataset_options.data_dir={data_dir}", cwd=tmp_path)
    line = _error_line(result)
    assert f"tfds build cifar10 --data_dir {data_dir}" in line
    assert "config.dataset_options.download" in line
    assert seconds < 90  # TensorFlow's import, not download retries


def test_imagenet_without_manual_files_fails_fast_with_what_to_do(tmp_path):
    data_dir = tmp_path / "tfds"
    result, seconds = _train(f"--config={CONFIGS / 'imagenet_resnet18_kure.py'}",
                             f"--config.dataset_options.data_dir={data_dir}", cwd=tmp_path)
    line = _error_line(result)
    manual = data_dir / "downloads" / "manual"
    assert f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into {manual}" in line
    assert "manual_dir" in line
    assert seconds < 90
