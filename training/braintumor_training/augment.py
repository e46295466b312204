"""Training-time augmentation for MRI slices, applied to batches of float pixels in [0, 255].

Two profiles:

- ``v1`` (what version 1 was trained with): mild left-right flip, rotation, zoom, brightness and
  contrast.
- ``robust``: what scanners and protocols really vary, as measured by ``braintumor robustness``, and
  what the preprocessing of version 2 (crop to the head, percentile stretch) does not already undo:
  gamma changes, a smooth MR bias field, noise, off-centre crops into the head, aspect-ratio changes,
  rotation, and milder brightness, contrast and zoom-out (what the crop and stretch leave of them).
  A first version of this profile, made for plain-resize preprocessing (zoom-out to 1/1.8 with black
  borders and contrast ±65 % on every image), learned about a third as fast; with the crop and stretch
  in the preprocessing those extremes never reach the model, so they were narrowed.

- ``sequence``: ``robust`` plus what another MRI sequence does to tissue contrast, so that the shape of a
  lesion, not the brightness of fluid, decides: a random intensity remapping (a random, not necessarily
  monotone curve, as T1, T2 and FLAIR order the tissues differently) and an inversion of the head's
  intensities (fluid dark becomes fluid bright). The background stays black in both. Made for version 3,
  after version 2 was found to call bright fluid (T2, FLAIR) "no tumour".

Each random transform draws from its own seeded generator, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

Transform = Callable[[tf.Tensor], tf.Tensor]


class _SeededTransform:
    """What the random intensity transforms share: a share of images transformed and an own generator.

    Args:
        probability: share of images transformed.
        seed: seed of this transform's own generator.
    """

    def __init__(self, probability: float, seed: int) -> None:
        self.probability = probability
        self.generator = tf.random.Generator.from_seed(seed)

    def _chosen(self, n: tf.Tensor, rank: int) -> tf.Tensor:
        """A float mask of shape ``[n, 1, ...]`` (``rank`` dimensions): 1 for the images to transform."""
        shape = tf.concat([[n], tf.ones([rank - 1], tf.int32)], axis=0)
        return tf.cast(self.generator.uniform(shape) < self.probability, tf.float32)


class RandomGamma(_SeededTransform):
    """Raise intensities (scaled to [0, 1]) to a random power, per image.

    Args:
        low, high: range of the gamma exponent, drawn log-uniformly.
        probability: share of images transformed.
        seed: seed of this transform's own generator.
    """

    def __init__(self, low: float = 0.45, high: float = 2.2, probability: float = 0.5, seed: int = 0) -> None:
        super().__init__(probability, seed)
        self.low, self.high = low, high

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        n = tf.shape(images)[0]
        log_gamma = self.generator.uniform([n, 1, 1, 1], tf.math.log(self.low), tf.math.log(self.high))
        gamma = tf.exp(log_gamma * self._chosen(n, 4))  # exponent 1 for the images left alone
        return 255.0 * tf.pow(tf.clip_by_value(images / 255.0, 0.0, 1.0), gamma)


class RandomBiasField(_SeededTransform):
    """Multiply by a smooth random field (a low-order polynomial), as MR coil sensitivity does.

    Args:
        amplitude: largest relative change of intensity (0.5 = ±50 %).
        probability: share of images transformed.
        seed: seed of this transform's own generator.
    """

    def __init__(self, amplitude: float = 0.5, probability: float = 0.5, seed: int = 0) -> None:
        super().__init__(probability, seed)
        self.amplitude = amplitude

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        n, h, w = shape[0], shape[1], shape[2]
        y = tf.linspace(-1.0, 1.0, h)[:, None] * tf.ones([1, w])
        x = tf.ones([h, 1]) * tf.linspace(-1.0, 1.0, w)[None, :]
        basis = tf.stack([x, y, x * y, x * x, y * y, x * x * y], axis=-1)  # [h, w, 6]
        coefficients = self.generator.normal([n, 6])
        field = tf.einsum("hwk,nk->nhw", basis, coefficients)
        field = field / (tf.reduce_max(tf.abs(field), axis=[1, 2], keepdims=True) + 1e-6)
        strength = self.amplitude * self.generator.uniform([n, 1, 1])
        return images * (1.0 + self._chosen(n, 3) * strength * field)[..., None]


class RandomNoise(_SeededTransform):
    """Additive Gaussian noise with a random standard deviation, per image.

    Args:
        max_sigma: largest standard deviation, in grey levels.
        probability: share of images transformed.
        seed: seed of this transform's own generator.
    """

    def __init__(self, max_sigma: float = 15.0, probability: float = 0.3, seed: int = 0) -> None:
        super().__init__(probability, seed)
        self.max_sigma = max_sigma

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        n = tf.shape(images)[0]
        sigma = self.max_sigma * self.generator.uniform([n, 1, 1, 1])
        chosen = self._chosen(n, 4)
        noise = self.generator.normal(tf.shape(images)[:3])[..., None]  # one grey noise for all channels
        return images + chosen * sigma * noise


class RandomIntensityRemap(_SeededTransform):
    """Map intensities through a random piecewise-linear curve, per image (another sequence's contrast).

    The curve passes through 0 at black (the background stays black) and through ``points`` random levels
    in [0, 1] at evenly spaced intensities; it need not be monotone, so tissues can change order, as they do
    between T1, T2 and FLAIR.

    Args:
        points: random levels of the curve (more: wilder contrast changes).
        background: intensities (of 255) up to which a pixel counts as background and stays black.
        probability: share of images transformed.
        seed: seed of this transform's own generator.
    """

    def __init__(self, points: int = 4, background: float = 8.0, probability: float = 0.3, seed: int = 0) -> None:
        super().__init__(probability, seed)
        self.points, self.background = points, background

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        n = shape[0]
        levels = tf.concat([tf.zeros([n, 1]), self.generator.uniform([n, self.points])], axis=1)  # [n, k+1]
        position = tf.reshape(tf.clip_by_value(images / 255.0, 0.0, 1.0), [n, -1]) * float(self.points)
        left = tf.minimum(tf.floor(position), float(self.points - 1))
        fraction = position - left
        left = tf.cast(left, tf.int32)
        low = tf.gather(levels, left, batch_dims=1)
        high = tf.gather(levels, left + 1, batch_dims=1)
        remapped = tf.reshape(255.0 * (low + (high - low) * fraction), shape)
        remapped = tf.where(images <= self.background, 0.0, remapped)
        chosen = self._chosen(n, 4)
        return chosen * remapped + (1.0 - chosen) * images


class RandomInversion(_SeededTransform):
    """Invert the intensities of the head (not of the black background), per image.

    Fluid that is dark on T1 becomes bright, as on T2, and the other way round.

    Args:
        background: intensities (of 255) up to which a pixel counts as background and stays black.
        probability: share of images transformed.
        seed: seed of this transform's own generator.
    """

    def __init__(self, background: float = 8.0, probability: float = 0.15, seed: int = 0) -> None:
        super().__init__(probability, seed)
        self.background = background

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        inverted = tf.where(images <= self.background, 0.0, 255.0 + self.background - images)
        chosen = self._chosen(tf.shape(images)[0], 4)
        return chosen * inverted + (1.0 - chosen) * images


#: Augmentation profiles (see the module's docstring).
AUGMENTATION_PROFILES = ("v1", "robust", "sequence")


def build_augmenter(seed: int, profile: str = "v1") -> Transform:
    """The augmentation pipeline of a profile (one of :data:`AUGMENTATION_PROFILES`), as one callable on a batch."""
    if profile == "v1":
        layers = keras.Sequential(
            [
                keras.layers.RandomFlip("horizontal", seed=seed),
                keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed + 1),
                keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
                keras.layers.RandomBrightness(0.1, value_range=(0.0, 255.0), seed=seed + 3),
                keras.layers.RandomContrast(0.1, value_range=(0.0, 255.0), seed=seed + 4),
            ],
            name="augment_v1",
        )
        return lambda images: layers(images, training=True)
    if profile not in AUGMENTATION_PROFILES:
        raise ValueError(f"augmentation profile must be one of {', '.join(AUGMENTATION_PROFILES)}, got {profile!r}")
    geometry = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.06, fill_mode="constant", seed=seed + 1),
            # independent height and width factors: crops into the head (negative), some zoom-out with
            # black borders (positive) and aspect-ratio changes (unequal)
            keras.layers.RandomZoom((-0.3, 0.15), (-0.3, 0.15), fill_mode="constant", seed=seed + 2),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 3),
        ],
        name="augment_geometry",
    )
    intensity = keras.Sequential(
        [
            keras.layers.RandomBrightness(0.1, value_range=(0.0, 255.0), seed=seed + 4),
            keras.layers.RandomContrast(0.25, value_range=(0.0, 255.0), seed=seed + 5),
        ],
        name="augment_intensity",
    )
    gamma = RandomGamma(low=0.5, high=2.2, probability=0.5, seed=seed + 6)
    bias = RandomBiasField(amplitude=0.4, probability=0.3, seed=seed + 7)
    noise = RandomNoise(max_sigma=15.0, probability=0.3, seed=seed + 8)
    sequence_contrast: list[Transform] = []
    if profile == "sequence":
        sequence_contrast = [
            RandomIntensityRemap(points=4, probability=0.3, seed=seed + 9),
            RandomInversion(probability=0.15, seed=seed + 10),
        ]

    def augment(images: tf.Tensor) -> tf.Tensor:
        images = geometry(images, training=True)
        for transform in sequence_contrast:  # before the scanner shifts: a sequence, then a scanner
            images = transform(images)
        images = intensity(images, training=True)
        images = noise(bias(gamma(images)))
        return tf.clip_by_value(images, 0.0, 255.0)

    return augment
