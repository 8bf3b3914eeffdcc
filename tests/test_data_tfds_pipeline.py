"""TFDS pipeline: ImageNet/CIFAR/plain preprocessing, imagenet2012 on mock data, messages."""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from kure_jax.data import DATASET_NAMES, get_dataset  # noqa: E402
from kure_jax.data.preprocess import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessing,
    random_resized_crop_window,
)
from kure_jax.data.tfds_pipeline import TFDS_DATASETS, TFDS_PREFIX, tfds_dataset  # noqa: E402

MEAN, STD = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def png(pixels):
    return tf.io.encode_png(tf.constant(pixels, tf.uint8))


def seed(i):
    return tf.constant([7, i], tf.int64)


def coordinate_image(height, width):
    """uint8 (H, W, 3): channel 0 = row, channel 1 = column, channel 2 = 255 - row."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, 255 - rows], -1).astype(np.uint8)


def unnormalize(image, mean, std):
    return np.round((np.asarray(image) * np.asarray(std) + np.asarray(mean)) * 255).astype(int)


# --- preprocessing ------------------------------------------------------------------------


def torchvision_crop_sizes(height, width, n, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """NumPy reference: torchvision's RandomResizedCrop.get_params rule, crop (h, w) only."""
    sizes = []
    for _ in range(n):
        for _ in range(10):
            area = height * width * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
            w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            image_ratio = width / height
            w = round(height * ratio[1]) if image_ratio > ratio[1] else width
            h = round(width / ratio[0]) if image_ratio < ratio[0] else height
        sizes.append((h, w))
    return np.array(sizes)


@pytest.mark.parametrize("shape", [(224, 224), (120, 300), (500, 90)])
def test_random_resized_crop_window_matches_torchvision_distribution(shape):
    height, width = shape
    n = 2000
    sample = tf.function(
        lambda: tf.map_fn(
            lambda i: random_resized_crop_window(tf.constant(shape), tf.stack([7, i])),
            tf.range(n, dtype=tf.int64),
            fn_output_signature=tf.int32,
        )
    )
    windows = sample().numpy()
    top, left, h, w = windows.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
    reference = torchvision_crop_sizes(height, width, 8000, np.random.default_rng(0))
    area_fraction = lambda hw: hw[:, 0] * hw[:, 1] / (height * width)
    log_ratio = lambda hw: np.log(hw[:, 1] / hw[:, 0])
    for stat in (area_fraction, log_ratio):
        ours, ref = stat(np.stack([h, w], 1)), stat(reference)
        stderr = ref.std() * np.sqrt(1 / n + 1 / len(ref))
        assert abs(ours.mean() - ref.mean()) < 4 * stderr, (ours.mean(), ref.mean())
        assert ours.min() >= ref.min() - 0.01 and ours.max() <= ref.max() + 0.01
    # Positions are uniform over the valid range: the mean relative offset is about 1/2.
    room = np.maximum(height - h, 1)
    assert abs(np.mean(top / room) - 0.5) < 0.1
    assert len({(a, b) for a, b in zip(top, left, strict=True)}) > n // 2


def test_random_resized_crop_window_falls_back_to_centre_crop():
    # A 4 x 400 strip: no crop with ratio <= 4/3 and area >= 8% fits, so torchvision's
    # fallback applies: full height, width round(4 * 4/3) = 5, centred.
    window = random_resized_crop_window(tf.constant([4, 400]), seed(0)).numpy()
    np.testing.assert_array_equal(window, [0, (400 - 5) // 2, 4, 5])


def test_normalisation_of_a_constant_image_is_exact():
    colour = np.array([200, 100, 50], np.uint8)
    encoded = png(np.broadcast_to(colour, (300, 260, 3)))
    spec = ImagePreprocessing(name="imagenet", image_size=64)
    expected = (colour / 255.0 - MEAN) / STD
    for image in (spec.eval(encoded), spec.train(encoded, seed(3))):
        assert image.shape == (64, 64, 3) and image.dtype == tf.float32
        np.testing.assert_allclose(image.numpy(), np.broadcast_to(expected, (64, 64, 3)), atol=1e-5)


@pytest.mark.parametrize("shape", [(256, 256), (512, 256), (256, 300)])
def test_imagenet_eval_is_a_centre_crop(shape):
    # The shorter side already is 256, so the resize is the identity and the output is
    # the exact centre 224 crop, normalised.
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = ImagePreprocessing(name="imagenet", image_size=224).eval(png(pixels)).numpy()
    top, left = (shape[0] - 224) // 2, (shape[1] - 224) // 2
    expected = (pixels[top : top + 224, left : left + 224] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_imagenet_eval_resizes_the_shorter_side():
    pixels = np.random.default_rng(1).integers(0, 256, (128, 200, 3), dtype=np.uint8)
    spec = ImagePreprocessing(name="imagenet", image_size=224)
    out = spec.eval(png(pixels)).numpy()
    resized = tf.image.resize(pixels, [256, 400], method="bilinear", antialias=True).numpy()
    expected = (resized[16:240, 88:312] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out, expected, atol=1e-4)
    np.testing.assert_array_equal(out, spec.eval(png(pixels)).numpy())  # deterministic


def test_imagenet_train_flips_half_the_time():
    # scale = ratio = 1 makes the crop the whole image, so the output is the image or its
    # mirror, exactly.
    pixels = coordinate_image(64, 64)
    spec = ImagePreprocessing(name="imagenet", image_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flips = []
    for i in range(40):
        out = unnormalize(spec.train(png(pixels), seed(i)), MEAN, STD)
        plain, mirrored = np.array_equal(out, pixels), np.array_equal(out, pixels[:, ::-1])
        assert plain != mirrored
        flips.append(mirrored)
    assert 10 <= sum(flips) <= 30


def test_imagenet_train_crops_exact_windows():
    # Area 1/4 and ratio 1 on a 256 square: 128 x 128 crops, resized to 128 (identity).
    pixels = coordinate_image(256, 256)
    spec = ImagePreprocessing(name="imagenet", image_size=128, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    corners = set()
    for i in range(20):
        out = unnormalize(spec.train(png(pixels), seed(i)), MEAN, STD)
        top, left = out[0, 0, 0], out[:, :, 1].min()
        window = pixels[top : top + 128, left : left + 128]
        assert np.array_equal(out, window) or np.array_equal(out, window[:, ::-1])
        corners.add((top, left))
    assert len(corners) > 10


def test_jpeg_fused_decode_crop_matches_the_generic_path():
    rng = np.random.default_rng(2)
    smooth = tf.image.resize(rng.integers(0, 256, (12, 16, 3)), [96, 128]).numpy()
    jpeg = tf.io.encode_jpeg(tf.constant(smooth.astype(np.uint8)), quality=90)
    same_pixels = png(tf.io.decode_jpeg(jpeg).numpy())  # lossless copy of the decoded JPEG
    spec = ImagePreprocessing(name="imagenet", image_size=48)
    for i in range(5):
        fused = spec.train(jpeg, seed(i)).numpy()
        generic = spec.train(same_pixels, seed(i)).numpy()
        # Same window and flip; libjpeg upsamples chroma slightly differently at the crop
        # border, so a few border pixels differ by a few grey levels (0.2 ~ 11 / 255 / std);
        # another window or flip would change most pixels by ~1.
        diff = np.abs(fused - generic)
        assert diff.max() < 0.2 and np.mean(diff > 1e-5) < 0.05, (diff.max(), np.mean(diff > 1e-5))


def test_cifar_pad_crop_flip_and_plain_eval():
    pixels = coordinate_image(32, 32)
    spec = ImagePreprocessing(name="cifar", image_size=32)
    padded = np.pad(pixels, [(4, 4), (4, 4), (0, 0)])
    candidates = {
        (t, s, f): padded[t : t + 32, s : s + 32, :][:, :: (-1 if f else 1)]
        for t in range(9)
        for s in range(9)
        for f in (0, 1)
    }
    seen = set()
    for i in range(30):
        out = unnormalize(spec.train(png(pixels), seed(i)), CIFAR10_MEAN, CIFAR10_STD)
        matches = [key for key, c in candidates.items() if np.array_equal(out, c)]
        assert matches
        seen.update(matches)
    assert len({k[:2] for k in seen}) > 10 and {k[2] for k in seen} == {0, 1}
    evaluated = unnormalize(spec.eval(png(pixels)), CIFAR10_MEAN, CIFAR10_STD)
    np.testing.assert_array_equal(evaluated, pixels)


def test_plain_scales_to_unit_interval_and_resizes_other_sizes():
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    spec = ImagePreprocessing(name="plain", image_size=28, channels=1)
    for out in (spec.eval(png(pixels)), spec.train(png(pixels), seed(0))):
        np.testing.assert_allclose(out.numpy(), pixels / 255.0, atol=1e-7)
    bigger = ImagePreprocessing(name="plain", image_size=14, channels=1).eval(png(pixels))
    assert bigger.shape == (14, 14, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "inception", "image_size": 224},
        {"name": "imagenet", "image_size": 0},
        {"name": "imagenet", "image_size": 224, "channels": 2},
        {"name": "imagenet", "image_size": 224, "scale": (0.5, 0.2)},
    ],
)
def test_preprocessing_rejects_bad_options(kwargs):
    with pytest.raises(
        ValueError, match=r"preprocessing must|image_size must|channels must|need 0 < scale"
    ):
        ImagePreprocessing(**kwargs)


# --- imagenet2012 on TFDS mock data -------------------------------------------------------


@pytest.fixture
def mock_imagenet(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in IMAGENET_TARS:  # mock_data skips preparation, but the manual check runs
        (manual / name).write_bytes(b"")
    # The mock must stay active while batches are read: it replaces the file reader.
    with tfds.testing.mock_data(num_examples=12):
        yield tfds_dataset("imagenet2012", data_dir=str(tmp_path), manual_dir=str(manual))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_imagenet_mock_shapes_and_normalisation(mock_imagenet):
    ds = mock_imagenet
    assert (ds.name, ds.num_classes, ds.image_shape) == ("imagenet2012", 1000, (224, 224, 3))
    assert ds.preprocessing.name == "imagenet" and ds.source.eval_split == "validation"
    batch = next(ds.train_batches(seed=0, start_step=0, global_batch_size=4))
    assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and np.all(
        (0 <= batch["label"]) & (batch["label"] < 1000)
    )
    evals = list(ds.eval_batches(global_batch_size=5))
    assert [e["image"].shape for e in evals] == [(5, 224, 224, 3)] * 3
    np.testing.assert_array_equal(np.concatenate([e["mask"] for e in evals]), [1] * 12 + [0] * 3)
    assert not np.any(evals[-1]["image"][2:])  # padding rows are zero
    for images in (batch["image"], np.concatenate([e["image"] for e in evals])[:12]):
        pixels = images * STD + MEAN  # back to [0, 1]: bilinear resizing cannot overshoot
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        # Mock pixels are uniform on [0, 255]: mean 0.5 (JPEG and resizing keep it).
        np.testing.assert_allclose(pixels.mean((0, 1, 2)), 0.5, atol=0.08)


def test_imagenet_mock_order_is_a_pure_function_of_seed_and_step(mock_imagenet):
    ds = mock_imagenet  # 12 examples, batch 4: 3 steps per epoch
    straight = take(ds.train_batches(seed=0, start_step=0, global_batch_size=4), 5)
    resumed = take(ds.train_batches(seed=0, start_step=2, global_batch_size=4), 3)
    for a, b in zip(straight[2:], resumed, strict=True):  # crosses the epoch boundary
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = next(ds.train_batches(seed=1, start_step=0, global_batch_size=4))
    assert not np.array_equal(other["image"], straight[0]["image"])
    # Mock splits hold the same 12 examples: an epoch is a permutation of them.
    epoch = np.concatenate([b["label"] for b in straight[:3]])
    evaluated = np.concatenate([e["label"] for e in ds.eval_batches(global_batch_size=4)])
    np.testing.assert_array_equal(np.sort(epoch), np.sort(evaluated))
    assert not np.array_equal(epoch, evaluated)  # shuffled


def test_imagenet_mock_augments_training_but_not_eval(mock_imagenet):
    ds = mock_imagenet
    first = list(ds.eval_batches(global_batch_size=4))
    second = list(ds.eval_batches(global_batch_size=4))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    # Mock labels are random in [0, 1000): they identify the 12 examples here.
    labels = np.concatenate([b["label"] for b in first])
    assert len(set(labels)) == 12
    eval_image = dict(zip(labels, np.concatenate([b["image"] for b in first]), strict=True))
    train = take(ds.train_batches(seed=0, start_step=0, global_batch_size=4), 6)  # 2 epochs
    seen = {}
    for batch in train:
        for label, image in zip(batch["label"], batch["image"], strict=True):
            assert not np.allclose(image, eval_image[label], atol=1e-3)  # cropped or flipped
            seen.setdefault(label, []).append(image)
    assert all(len(v) == 2 and not np.allclose(v[0], v[1], atol=1e-3) for v in seen.values())


# --- messages -----------------------------------------------------------------------------


def test_missing_imagenet_manual_files_say_what_to_download_and_where(tmp_path):
    manual = tmp_path / "manual"
    with pytest.raises(FileNotFoundError) as info:
        tfds_dataset("imagenet2012", data_dir=str(tmp_path), manual_dir=str(manual))
    message = str(info.value)
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
    assert str(manual) in message and "image-net.org" in message
    manual.mkdir()
    (manual / IMAGENET_TARS[0]).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"put {IMAGENET_TARS[1]} into {manual}"):
        tfds_dataset("imagenet2012", data_dir=str(tmp_path), manual_dir=str(manual))
    default = os.path.join(str(tmp_path), "downloads", "manual")
    with pytest.raises(FileNotFoundError, match=default):
        tfds_dataset("imagenet2012", data_dir=str(tmp_path))


def test_unprepared_dataset_without_download_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"tfds build mnist --data_dir {tmp_path}"):
        tfds_dataset("tfds:mnist", data_dir=str(tmp_path), download=False)


def test_unknown_and_non_image_datasets_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset'"):
        tfds_dataset("tfds:no_such_dataset", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match="not image classification"):
            tfds_dataset("tfds:imdb_reviews", data_dir=str(tmp_path))
        with pytest.raises(ValueError, match="preprocessing must be one of"):
            tfds_dataset("mnist", data_dir=str(tmp_path), preprocessing="fancy")


def test_registry_passes_tfds_names_and_checks_options(tmp_path):
    assert set(TFDS_DATASETS) <= set(DATASET_NAMES)
    # The registry's "mnist" reads IDX files (test_data_fashion_mnist.py); TFDS's is tfds:mnist.
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        get_dataset(f"{TFDS_PREFIX}mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(ValueError, match=r"'cifar10' takes the options .*unknown: \['max_shift'\]"):
        get_dataset("cifar10", data_dir=str(tmp_path), max_shift=2)
