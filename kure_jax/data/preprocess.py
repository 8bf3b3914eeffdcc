"""Per-example image preprocessing for the TFDS and image-folder pipelines (TensorFlow).

Importing this module imports TensorFlow; :mod:`kure_jax.data.tfds_pipeline` and
:mod:`kure_jax.data.folder` import it only when a TFDS or folder dataset is built.

Every function takes *encoded* image bytes (JPEG, PNG, GIF or BMP) and returns a float32
``(image_size, image_size, channels)`` tensor. Training functions are stateless: their
randomness comes from an explicit ``seed`` (an int64 ``(2,)`` tensor), so the same
example and seed always give the same pixels, which is what bit-exact resumption needs.

Three presets, chosen by :class:`ImagePreprocessing`'s ``name``:

* ``"imagenet"`` (torchvision's recipe, used by the paper): training takes a random
  crop whose area is a fraction ``U(0.08, 1)`` of the image and whose aspect ratio is
  log-uniform in ``[3/4, 4/3]`` (10 attempts, then a centre crop of the clamped ratio),
  resizes it to ``image_size`` and flips it horizontally with probability 1/2.
  Evaluation resizes the shorter side to ``round(image_size * 256 / 224)`` and takes the
  central ``image_size`` square. Pixels are then normalised with the ImageNet RGB mean
  and standard deviation. JPEG training crops are decoded fused with the crop
  (``tf.io.decode_and_crop_jpeg``), so only the crop is decompressed.
* ``"cifar"``: training pads 4 zero pixels on each side, takes a random ``image_size``
  crop and flips with probability 1/2; evaluation uses the image as is. CIFAR-10 mean
  and standard deviation.
* ``"plain"``: no augmentation and pixels scaled to ``[0, 1]`` (as ``mnist5k``), e.g.
  for MNIST.

All resizing is bilinear with antialiasing; ``"cifar"`` and ``"plain"`` resize only
images that are not already ``image_size`` square.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESSINGS",
    "ImagePreprocessing",
    "hide_gpus_from_tensorflow",
    "random_resized_crop_window",
]

PREPROCESSINGS = ("imagenet", "cifar", "plain")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_STATS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar": (CIFAR10_MEAN, CIFAR10_STD),
    "plain": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
_CIFAR_PADDING = 4


def hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow off the accelerators, which JAX owns (no TF GPU memory grab).

    Must run before TensorFlow initialises its devices; afterwards it is a no-op
    (TensorFlow no longer allows the change, and a ``tensorflow-cpu`` build has no GPU).
    """
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised
        pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImagePreprocessing:
    """How images are decoded, augmented and normalised (see the module docstring).

    Attributes:
      name: one of ``PREPROCESSINGS``.
      image_size: side of the square output image.
      channels: 1 (grayscale) or 3 (RGB); images are converted on decoding. With one
        channel the mean and standard deviation are the averages of the RGB values.
      scale: ``"imagenet"`` training crop area range, as fractions of the image area.
      ratio: ``"imagenet"`` training crop aspect-ratio (width / height) range.

    Raises:
      ValueError: for an unknown name, a size < 1, channels not in (1, 3) or invalid
        ranges.
    """

    name: str
    image_size: int
    channels: int = 3
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.name not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {list(PREPROCESSINGS)}; got {self}.")
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or (self.image_size < 1)
        ):
            raise ValueError(f"image_size must be an integer >= 1; got {self}.")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {self}.")
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1]: {self}."
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(image_size, image_size, channels)``."""
        return (self.image_size, self.image_size, self.channels)

    @property
    def eval_resize(self) -> int:
        """``"imagenet"`` evaluation: shorter side before the centre crop (256 for 224)."""
        return round(self.image_size * 256 / 224)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of ``[0, 1]`` pixels."""
        mean, std = _STATS[self.name]
        if self.channels == 1:
            return (sum(mean) / 3,), (sum(std) / 3,)
        return mean, std

    def train(self, encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Decodes and augments one training image.

        Args:
          encoded: scalar string tensor, the encoded image.
          seed: int64 ``(2,)`` stateless seed; equal seeds give equal outputs.

        Returns:
          float32 ``(image_size, image_size, channels)``, normalised.
        """
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if self.name == "imagenet":
            image = self._decode_random_resized_crop(encoded, crop_seed)
            image = _resize(image, (self.image_size, self.image_size))
        else:
            image = self._decode_square(encoded)
            if self.name == "cifar":
                image = _pad_random_crop(image, crop_seed, self.image_size, _CIFAR_PADDING)
        if self.name != "plain":
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return self._normalize(image)

    def eval(self, encoded: tf.Tensor) -> tf.Tensor:
        """Decodes one evaluation image (deterministic, no augmentation).

        Args:
          encoded: scalar string tensor, the encoded image.

        Returns:
          float32 ``(image_size, image_size, channels)``, normalised.
        """
        if self.name != "imagenet":
            return self._normalize(self._decode_square(encoded))
        image = _decode(encoded, self.channels)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        factor = self.eval_resize / tf.reduce_min(shape)
        # Round, but never below the crop: the shorter side becomes exactly eval_resize.
        resized = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), self.eval_resize)
        image = _resize(image, resized)
        top, left = (resized[0] - self.image_size) // 2, (resized[1] - self.image_size) // 2
        image = image[top : top + self.image_size, left : left + self.image_size]
        return self._normalize(image)

    def _decode_square(self, encoded: tf.Tensor) -> tf.Tensor:
        image = _decode(encoded, self.channels)
        size = self.image_size
        is_square = tf.reduce_all(tf.shape(image)[:2] == size)
        image = tf.cond(
            is_square, lambda: tf.cast(image, tf.float32), lambda: _resize(image, (size, size))
        )
        return tf.ensure_shape(image, self.image_shape)

    def _decode_random_resized_crop(self, encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        def jpeg() -> tf.Tensor:
            shape = tf.image.extract_jpeg_shape(encoded)[:2]
            window = random_resized_crop_window(shape, seed, scale=self.scale, ratio=self.ratio)
            return tf.io.decode_and_crop_jpeg(encoded, window, channels=self.channels)

        def other() -> tf.Tensor:
            image = _decode(encoded, self.channels)
            top, left, height, width = tf.unstack(
                random_resized_crop_window(
                    tf.shape(image)[:2], seed, scale=self.scale, ratio=self.ratio
                )
            )
            return image[top : top + height, left : left + width]

        return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)

    def _normalize(self, image: tf.Tensor) -> tf.Tensor:
        mean, std = self.mean_std()
        image = tf.ensure_shape(tf.cast(image, tf.float32) / 255.0, self.image_shape)
        return (image - tf.constant(mean)) / tf.constant(std)


def random_resized_crop_window(
    shape: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tf.Tensor:
    """Samples the crop window of an Inception-style random-resized crop (torchvision's rule).

    Each attempt draws a target area ``A ~ U(scale) * H * W`` and an aspect ratio
    ``r = exp(U(log ratio))``; the crop is ``w = round(sqrt(A r))``,
    ``h = round(sqrt(A / r))``. The first attempt with ``0 < h <= H`` and ``0 < w <= W``
    wins; if none does, the crop is the largest centred window whose ratio is ``r``
    clamped to ``ratio``. The top-left corner is uniform over the valid positions.

    Args:
      shape: int32 ``(2,)``: image height ``H`` and width ``W``.
      seed: int64 ``(2,)`` stateless seed.
      scale: area range as fractions of ``H * W``.
      ratio: width / height range.
      attempts: number of tries before the fallback.

    Returns:
      int32 ``(4,)``: ``[top, left, height, width]``.
    """
    shape = tf.cast(shape, tf.int32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    height, width = tf.unstack(tf.cast(shape, tf.float32))
    area = height * width * tf.random.stateless_uniform([attempts], seeds[0], *scale)
    log_ratio = tf.random.stateless_uniform(
        [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1])
    )
    aspect = tf.exp(log_ratio)
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    ok = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(ok, tf.int32))  # index of the first success (0 if none)
    image_ratio = width / height
    fallback_w = tf.where(image_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fallback_h = tf.where(image_ratio < ratio[0], tf.round(width / ratio[0]), height)
    any_ok = tf.reduce_any(ok)
    crop_h = tf.cast(tf.where(any_ok, crop_h[first], fallback_h), tf.int32)
    crop_w = tf.cast(tf.where(any_ok, crop_w[first], fallback_w), tf.int32)
    top = _uniform_int(seeds[2], shape[0] - crop_h)
    left = _uniform_int(seeds[3], shape[1] - crop_w)
    centred = tf.logical_not(any_ok)
    top = tf.where(centred, (shape[0] - crop_h) // 2, top)
    left = tf.where(centred, (shape[1] - crop_w) // 2, left)
    return tf.stack([top, left, crop_h, crop_w])


def _uniform_int(seed: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Uniform int32 in ``[0, high]`` (inclusive)."""
    high = tf.cast(high, tf.int32)
    return tf.random.stateless_uniform([], seed, minval=0, maxval=high + 1, dtype=tf.int32)


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])


def _resize(image: tf.Tensor, size: tf.Tensor | tuple[int, int]) -> tf.Tensor:
    return tf.image.resize(image, size, method="bilinear", antialias=True)


def _pad_random_crop(image: tf.Tensor, seed: tf.Tensor, size: int, padding: int) -> tf.Tensor:
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    seeds = tf.random.experimental.stateless_split(seed, 2)
    top = _uniform_int(seeds[0], 2 * padding)
    left = _uniform_int(seeds[1], 2 * padding)
    return padded[top : top + size, left : left + size]
