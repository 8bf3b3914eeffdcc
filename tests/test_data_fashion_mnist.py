"""The ``fashion_mnist`` and ``mnist`` datasets of kure_jax.data.idx_datasets.

Order, sharding, resumption and augmentation are checked on small IDX files the tests write
themselves, so they run everywhere; the checks of the real Fashion-MNIST files run where Debian's
``dataset-fashion-mnist`` package or Keras' cache provides them (``.ci/run`` installs the
package) and are skipped with the reason elsewhere.
"""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from _training_helpers import ROOT

from kure_jax.data import get_dataset, idx_datasets
from kure_jax.data.idx import read_idx
from kure_jax.data.idx_datasets import IDX_FILES, find_idx_files, load_idx_split

STEMS = [stem for pair in IDX_FILES.values() for stem in pair]


def _real_files():
    try:
        return find_idx_files("fashion_mnist")
    except FileNotFoundError as err:
        pytest.skip(f"the Fashion-MNIST files are not on this machine ({err})")


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """48 training and 10 test 'images' of random bytes, label = index % 10 (train gzipped)."""
    folder = tmp_path_factory.mktemp("fake_fashion_mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 10)):
        images, labels = IDX_FILES[split]
        compress = split == "train"
        suffix = ".gz" if compress else ""
        _write_idx(folder / f"{images}{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(folder / f"{labels}{suffix}", np.arange(n) % 10, compress)
    return folder


# ------------------------------------------------------------------ the real files


def test_real_files_have_the_published_sizes_classes_and_pixels():
    files = _real_files()
    for split, n, per_class in (("train", 60_000, 6_000), ("test", 10_000, 1_000)):
        images_stem, labels_stem = IDX_FILES[split]
        images, labels = read_idx(files[images_stem]), read_idx(files[labels_stem])
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
        assert images.min() == 0 and images.max() == 255
        # The dataset's float pixels are the bytes / 255.
        floats, ints = load_idx_split("fashion_mnist", split)
        assert floats.shape == (n, 28, 28, 1) and floats.dtype == np.float32
        np.testing.assert_array_equal(floats[:100, ..., 0], images[:100] / np.float32(255))
        np.testing.assert_array_equal(ints, labels)


def test_real_dataset_in_the_registry():
    _real_files()
    data = get_dataset("fashion_mnist")
    assert (data.num_train_examples, data.num_eval_examples) == (60_000, 10_000)
    assert data.image_shape == (28, 28, 1) and data.num_classes == 10
    assert (data.max_shift, data.flip) == (2, True)
    assert get_dataset("fashion_mnist", num_train=500).num_train_examples == 500


@pytest.mark.slow
def test_train_py_runs_a_few_steps_on_fashion_mnist(tmp_path):
    _real_files()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         f"--config={ROOT / 'configs' / 'fashion_mnist_kure.py'}:tiny", f"--workdir={tmp_path}"],
        cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final test accuracy" in result.stdout and "(10000 images)" in result.stdout


# ------------------------------------------------------------------ files the test writes


def test_order_resume_and_one_epoch_per_pass(fake_dir):
    data = get_dataset("fashion_mnist", data_dir=str(fake_dir), max_shift=0, flip=False)
    assert (data.num_train_examples, data.num_eval_examples) == (48, 10)
    batches = data.train_batches(seed=3, start_step=0, global_batch_size=8)
    run = [next(batches) for _ in range(8)]  # 6 steps per epoch: crosses into epoch 2
    resumed = next(data.train_batches(seed=3, start_step=7, global_batch_size=8))
    for key in ("image", "label"):
        np.testing.assert_array_equal(resumed[key], run[7][key])
    epoch = np.concatenate([b["image"] for b in run[:6]]).reshape(48, -1)
    np.testing.assert_array_equal(np.unique(epoch, axis=0),
                                  np.unique(data.train_images.reshape(48, -1), axis=0))
    other = next(data.train_batches(seed=4, start_step=0, global_batch_size=8))
    assert not np.array_equal(other["label"], run[0]["label"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_make_up_the_global_batch(fake_dir, process_count):
    data = get_dataset("fashion_mnist", data_dir=str(fake_dir))  # augmented: max_shift 2, flip
    whole = next(data.train_batches(seed=1, start_step=5, global_batch_size=16))
    shards = [next(data.train_batches(seed=1, start_step=5, global_batch_size=16,
                                      process_index=i, process_count=process_count))
              for i in range(process_count)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), whole[key])
    evals = [list(data.eval_batches(global_batch_size=8, process_index=i,
                                    process_count=process_count)) for i in range(process_count)]
    mask = np.concatenate([np.concatenate([s[j]["mask"] for s in evals]) for j in range(2)])
    labels = np.concatenate([np.concatenate([s[j]["label"] for s in evals]) for j in range(2)])
    assert mask.sum() == 10 and not mask[10:].any()  # 10 test images, padded to 16
    np.testing.assert_array_equal(labels[:10], np.arange(10) % 10)


def _shifted(image, dy, dx):
    """Reference translation with zero fill (np.roll, then the wrapped rows/cols zeroed)."""
    out = np.roll(image, (dy, dx), axis=(0, 1))
    out[: max(dy, 0)] = out[out.shape[0] + min(dy, 0):] = 0
    out[:, : max(dx, 0)] = out[:, out.shape[1] + min(dx, 0):] = 0
    return out


def test_augmentation_is_pad2_crop_and_horizontal_flip(fake_dir):
    data = get_dataset("fashion_mnist", data_dir=str(fake_dir))
    plain = get_dataset("fashion_mnist", data_dir=str(fake_dir), max_shift=0, flip=False)
    seen_flips, seen_shifts = set(), set()
    for step in range(3):
        got = next(data.train_batches(seed=0, start_step=step, global_batch_size=16))
        base = next(plain.train_batches(seed=0, start_step=step, global_batch_size=16))
        np.testing.assert_array_equal(got["label"], base["label"])  # same order
        for image, original in zip(got["image"], base["image"], strict=True):
            matches = {(dy, dx, flip)
                       for dy in range(-2, 3) for dx in range(-2, 3) for flip in (False, True)
                       if np.array_equal(image, _shifted(original[:, ::-1] if flip else original,
                                                         dy, dx))}
            assert matches, "each image is a flipped or unflipped crop of the padded original"
            seen_flips |= {m[2] for m in matches}
            seen_shifts |= {m[:2] for m in matches}
    assert seen_flips == {False, True} and len(seen_shifts) > 5


def test_mnist_reads_the_same_files_without_flips(fake_dir):
    data = get_dataset("mnist", data_dir=str(fake_dir), max_shift=1)
    assert (data.name, data.flip, data.max_shift, data.num_eval_examples) == ("mnist", False, 1, 10)
    np.testing.assert_array_equal(data.eval_labels, np.arange(10) % 10)
    with pytest.raises(ValueError, match=r"'mnist' takes the options .*unknown: \['flip'\]"):
        get_dataset("mnist", data_dir=str(fake_dir), flip=True)


def test_subset_and_option_errors(fake_dir):
    data = get_dataset("fashion_mnist", data_dir=str(fake_dir), num_train=20)
    assert data.num_train_examples == 20 and data.num_eval_examples == 10
    for bad in (0, 49, True):
        with pytest.raises(ValueError, match=r"num_train must be in \[1, 48\]"):
            get_dataset("fashion_mnist", data_dir=str(fake_dir), num_train=bad)
    with pytest.raises(ValueError, match="flip must be a bool"):
        get_dataset("fashion_mnist", data_dir=str(fake_dir), flip="yes")


# ------------------------------------------------------------------ where files are looked for


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_files_give_one_line_with_the_three_ways(tmp_path, fake_dir):
    (tmp_path / f"{STEMS[0]}.gz").write_bytes((fake_dir / f"{STEMS[0]}.gz").read_bytes())
    with pytest.raises(FileNotFoundError) as err:  # 1 of the 4 files is not enough
        get_dataset("fashion_mnist", data_dir=str(tmp_path))
    message = _one_line(err)
    assert f"not in {tmp_path};" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "keras.datasets.fashion_mnist.load_data()" in message
    assert "--config.dataset_options.data_dir=DIR" in message
    with pytest.raises(FileNotFoundError) as err:
        get_dataset("mnist")
    assert "data_dir not set" in _one_line(err) and "tfds:mnist" in _one_line(err)


def test_default_places_are_debian_then_keras(tmp_path, fake_dir, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    dirs = idx_datasets.default_dirs("fashion_mnist")
    assert [str(d) for d in dirs[:2]] == ["/usr/share/datasets/fashion-mnist",
                                          str(tmp_path / "kh" / "datasets" / "fashion-mnist")]
    monkeypatch.delenv("KERAS_HOME")
    assert dirs != idx_datasets.default_dirs("fashion_mnist")
    assert str(idx_datasets.default_dirs("fashion_mnist")[1]).endswith(".keras/datasets/"
                                                                       "fashion-mnist")
    # Keras' cache is used where Debian's folder lacks the files.
    keras = tmp_path / "kh" / "datasets" / "fashion-mnist"
    keras.mkdir(parents=True)
    for path in fake_dir.iterdir():
        (keras / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setattr(idx_datasets, "_DEBIAN_DIR", str(tmp_path / "no_debian"))
    assert find_idx_files("fashion_mnist")[STEMS[0]] == keras / f"{STEMS[0]}.gz"
    assert idx_datasets.default_dirs("mnist") == ()


@pytest.mark.slow
def test_train_py_without_the_files_prints_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         f"--config={ROOT / 'configs' / 'fashion_mnist_kure.py'}:tiny",
         f"--config.dataset_options.data_dir={tmp_path / 'empty'}", f"--workdir={tmp_path / 'w'}"],
        cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=180,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "apt-get install dataset-fashion-mnist" in errors[0], errors
