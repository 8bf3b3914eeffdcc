"""Image-folder pipeline on a tiny folder of real MNIST digits: batches, order, training."""

import json

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

from _training_helpers import load_config  # noqa: E402

from kure_jax.data import Dataset, get_dataset, load_mnist5k  # noqa: E402
from kure_jax.data.folder import folder_dataset  # noqa: E402
from kure_jax.training import train_and_evaluate  # noqa: E402

PER_CLASS = {"train": 8, "test": 3}  # 80 training and 30 test digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """root/{train,test}/<digit>/<k>.png from real MNIST digits; returns (root, pixels->label)."""
    root = tmp_path_factory.mktemp("digits")
    lookup = {}
    for split, count in PER_CLASS.items():
        data = load_mnist5k(split)
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(data.labels == digit)[:count]):
                pixels = np.round(data.images[i, ..., 0] * 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / str(digit) / f"{k}.png")
                lookup[(split, pixels.tobytes())] = digit
    return root, lookup


@pytest.fixture(scope="module")
def dataset(digits):
    return folder_dataset(data_dir=str(digits[0]), preprocessing="plain", image_size=28, channels=1)


def keys(images):
    """Each image of a (b, 28, 28, 1) [0, 1] batch as its uint8 bytes."""
    return [np.round(x[..., 0] * 255).astype(np.uint8).tobytes() for x in images]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_hold_the_digits_with_their_labels(digits, dataset):
    _, lookup = digits
    assert isinstance(dataset, Dataset)
    assert (dataset.num_classes, dataset.image_shape) == (10, (28, 28, 1))
    assert (dataset.num_train_examples, dataset.num_eval_examples) == (80, 30)
    epoch = take(dataset.train_batches(seed=0, start_step=0, global_batch_size=16), 5)
    seen = []
    for batch in epoch:
        assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        for key, label in zip(keys(batch["image"]), batch["label"], strict=True):
            assert lookup[("train", key)] == label  # the decoded PNG is the digit, exactly
        seen += keys(batch["image"])
    assert sorted(seen) == sorted(k for s, k in lookup if s == "train")  # an epoch: each once

    evals = list(dataset.eval_batches(global_batch_size=16))
    mask = np.concatenate([e["mask"] for e in evals])
    np.testing.assert_array_equal(mask, [1] * 30 + [0] * 2)
    images = np.concatenate([e["image"] for e in evals])
    labels = np.concatenate([e["label"] for e in evals])
    assert [lookup[("test", k)] for k in keys(images[:30])] == list(labels[:30])
    assert sorted(keys(images[:30])) == sorted(k for s, k in lookup if s == "test")
    assert not images[30:].any()


def test_order_is_a_pure_function_of_seed_and_step(dataset):
    straight = take(dataset.train_batches(seed=3, start_step=0, global_batch_size=16), 12)
    for start in (4, 5, 11):  # inside epoch 0, at the start of epoch 1, inside epoch 2
        resumed = take(dataset.train_batches(seed=3, start_step=start, global_batch_size=16), 1)
        np.testing.assert_array_equal(resumed[0]["image"], straight[start]["image"])
        np.testing.assert_array_equal(resumed[0]["label"], straight[start]["label"])
    order = [k for b in straight for k in keys(b["image"])]
    assert order[:80] != order[80:160]  # every epoch is reshuffled
    other = next(dataset.train_batches(seed=4, start_step=0, global_batch_size=16))
    assert keys(other["image"]) != order[:16]


def test_processes_read_disjoint_shares(digits, dataset):
    _, lookup = digits
    shares = [
        take(
            dataset.train_batches(
                seed=0, start_step=0, global_batch_size=16, process_index=i, process_count=2
            ),
            5,
        )
        for i in range(2)
    ]
    rows = [[k for b in share for k in keys(b["image"])] for share in shares]
    assert all(b["image"].shape[0] == 8 for share in shares for b in share)
    assert len(set(rows[0]) | set(rows[1])) == 80  # 40 each, disjoint: the whole split

    evals = [
        list(dataset.eval_batches(global_batch_size=8, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(evals[0]) == len(evals[1]) == 4  # ceil(15 / 4) on both processes
    found = [
        k
        for share in evals
        for b in share
        for k, m in zip(keys(b["image"]), b["mask"], strict=True)
        if m
    ]
    assert sorted(found) == sorted(k for s, k in lookup if s == "test")


def test_imagenet_preprocessing_on_a_folder(digits):
    ds = folder_dataset(data_dir=str(digits[0]), image_size=32)  # RGB, random-resized crops
    batch = next(ds.train_batches(seed=0, start_step=0, global_batch_size=10))
    assert batch["image"].shape == (10, 32, 32, 3)
    first, second = (next(ds.eval_batches(global_batch_size=10)) for _ in range(2))
    np.testing.assert_array_equal(first["image"], second["image"])


def test_folder_errors(tmp_path, digits):
    with pytest.raises(FileNotFoundError, match="root/<split>/<class>"):
        folder_dataset(data_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no split folders"):
        folder_dataset(data_dir=str(tmp_path))
    root = str(digits[0])
    with pytest.raises(ValueError, match=r"no evaluation split.*found \['train'\]"):
        folder_dataset(data_dir=str(_only_train(tmp_path, digits[0])))
    with pytest.raises(ValueError, match="no images in split 'valid'"):
        folder_dataset(data_dir=root, eval_split="valid")
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        folder_dataset(data_dir=root, preprocessing="none")
    ds = folder_dataset(data_dir=root, preprocessing="plain", image_size=28, channels=1)
    with pytest.raises(ValueError, match="exceeds"):
        ds.train_batches(seed=0, start_step=0, global_batch_size=96)
    with pytest.raises(ValueError, match="seed"):
        ds.train_batches(seed=-1, start_step=0, global_batch_size=8)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ds.eval_batches(global_batch_size=9, process_count=2)


def test_registry_builds_the_folder_and_checks_its_options(digits):
    root = str(digits[0])
    ds = get_dataset("folder", data_dir=root, preprocessing="plain", image_size=28, channels=1)
    assert (ds.name, ds.num_train_examples) == ("folder", 80)
    with pytest.raises(ValueError, match=r"'folder' takes the options .*missing: \['data_dir'\]"):
        get_dataset("folder")
    with pytest.raises(ValueError, match=r"unknown: \['image_shape'\]"):
        get_dataset("folder", data_dir=root, image_shape=28)


def _only_train(tmp_path, root):
    only = tmp_path / "only_train"
    (only / "train" / "0").mkdir(parents=True)
    source = next((root / "train" / "0").iterdir())
    (only / "train" / "0" / source.name).write_bytes(source.read_bytes())
    return only


def tiny_config():
    config = load_config("mnist5k_kure", "tiny")
    config.dataset = "folder"
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    return config


@pytest.mark.slow
def test_training_runs_on_the_folder(digits, tmp_path):
    config = tiny_config()
    config.dataset_options = ml_collections.ConfigDict(
        {"data_dir": str(digits[0]), "preprocessing": "plain", "image_size": 28, "channels": 1}
    )
    result = train_and_evaluate(config, tmp_path)
    assert int(result.state.step) == 4
    assert result.eval_metrics["count"] == 30  # every test digit once, padding masked out
    assert np.isfinite(result.eval_metrics["loss"]) and 0 <= result.eval_metrics["accuracy"] <= 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(x.get("loss", np.nan)) for x in lines)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
