"""The network: Keras MobileNetV3Small with a 4-class head, and the served (exported) form of it."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from braintumor.config import CHANNELS, HEATMAP_NAME, IMAGE_SIZE, INPUT_NAME, LABELS, OUTPUT_NAME

#: BatchNorm momentum for training from scratch. Keras' MobileNetV3 default (0.999) lets the moving
#: statistics lag the weights so far that a from-scratch model outputs a constant in inference mode.
BN_MOMENTUM = 0.9


def set_batchnorm_momentum(model: keras.Model, momentum: float = BN_MOMENTUM) -> int:
    """Set the momentum of every BatchNormalization layer (nested models included).

    Returns:
        How many layers were changed.
    """
    changed = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            changed += 1
    return changed


def build_classifier(
    image_size: int = IMAGE_SIZE,
    num_classes: int = len(LABELS),
    weights: Path | None = None,
    dropout: float = 0.2,
    bn_momentum: float = BN_MOMENTUM,
) -> keras.Model:
    """MobileNetV3Small taking float pixels in [0, 255] and returning class logits.

    The head mirrors Keras' own MobileNetV3 top (global pooling, a 1024-wide hard-swish layer,
    dropout, the classifier), so the backbone can start from a local ``include_top=False`` weights
    file.

    Args:
        image_size: side of the square input.
        num_classes: number of output logits.
        weights: optional backbone weights file (a Keras ``MobileNetV3Small(include_top=False)`` file).
        dropout: dropout rate before the classifier.
        bn_momentum: momentum given to every BatchNormalization layer.
    """
    inputs = keras.Input((image_size, image_size, CHANNELS), dtype="float32", name=INPUT_NAME)
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(image_size, image_size, CHANNELS),
        include_top=False,
        weights=None,
        pooling="avg",
        include_preprocessing=True,
    )
    if weights is not None:
        backbone.load_weights(str(weights))
    x = backbone(inputs)
    x = keras.layers.Dense(1024, activation="hard_swish", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    model = keras.Model(inputs, logits, name="braintumor_mobilenetv3small")
    set_batchnorm_momentum(model, bn_momentum)
    return model


class GradCamHead(keras.layers.Layer):
    """The classifier's head, recomputed from the last convolution's feature map, plus Grad-CAM maps.

    The head after the last convolution is global average pooling, a hard-swish dense layer and the
    logits layer, so the gradient of each class logit with respect to the feature map has a closed form:
    ``∂y_c/∂A[i, j, k] = (1/HW) · (K1 · (hswish'(z1) ⊙ K2[:, c]))[k]``. Computing it in the graph lets
    ONNX Runtime serve Grad-CAM without TensorFlow.

    Args:
        dense: the trained ``head_dense`` layer (hard swish).
        logits: the trained ``logits`` layer.
    """

    def __init__(self, dense: keras.layers.Dense, logits: keras.layers.Dense, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dense, self.logits = dense, logits

    def call(self, features):  # features: [batch, h, w, channels]
        ops = keras.ops
        height, width, channels = features.shape[1], features.shape[2], features.shape[3]
        pooled = ops.mean(features, axis=(1, 2))
        z1 = ops.matmul(pooled, self.dense.kernel) + self.dense.bias
        hidden = z1 * ops.relu6(z1 + 3.0) / 6.0  # hard swish
        logits = ops.matmul(hidden, self.logits.kernel) + self.logits.bias
        slope = ops.where(z1 <= -3.0, 0.0, ops.where(z1 >= 3.0, 1.0, (2.0 * z1 + 3.0) / 6.0))
        upstream = slope[:, :, None] * self.logits.kernel[None, :, :]  # [batch, 1024, classes]
        weights = ops.matmul(self.dense.kernel[None, :, :], upstream) / float(height * width)  # [b, ch, c]
        flat = ops.reshape(features, (-1, height * width, channels))
        cams = ops.relu(ops.matmul(flat, weights))  # [batch, h*w, classes]
        cams = ops.transpose(ops.reshape(cams, (-1, height, width, logits.shape[-1])), (0, 3, 1, 2))
        peak = ops.max(cams, axis=(2, 3), keepdims=True)
        return logits, cams / ops.maximum(peak, 1e-12)


class MirroredBatch(keras.layers.Layer):
    """Stack a batch of images ``[n, H, W, C]`` and their left-right mirrors into one batch of ``2n``."""

    def call(self, images):
        return keras.ops.concatenate([images, keras.ops.flip(images, axis=2)], axis=0)


class BatchHalves(keras.layers.Layer):
    """Undo :class:`MirroredBatch` on an output: the mean of its two halves, or its first half.

    Args:
        mean: average the images' and the mirrors' values (``True``) or keep the images' own (``False``).
    """

    def __init__(self, mean: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean = mean

    def call(self, values):
        n = keras.ops.shape(values)[0] // 2
        first = values[:n]
        return (first + values[n:]) / 2.0 if self.mean else first


def feature_model(classifier: keras.Model) -> keras.Model:
    """The classifier's backbone up to its last convolution (before global pooling)."""
    backbone = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    return keras.Model(backbone.inputs, backbone.layers[-2].output, name="features")


#: Test-time augmentation modes: ``none``, or ``flip`` (mean logits of the image and its left-right mirror).
TTA_MODES = ("none", "flip")


def classifier_at_size(classifier: keras.Model, image_size: int) -> keras.Model:
    """The same trained classifier, rebuilt for square inputs of another side.

    The network ends in global pooling, so every weight fits any input size; this copies them all into a
    network built by :func:`build_classifier` at ``image_size``.

    Args:
        classifier: a classifier made by :func:`build_classifier` (a run's ``best.keras``).
        image_size: side of the new square input.
    """
    resized = build_classifier(image_size=image_size)
    resized.set_weights(classifier.get_weights())
    return resized


def tta_logits(classifier: keras.Model, pixels: np.ndarray, tta: str = "none", batch_size: int = 64) -> np.ndarray:
    """The classifier's logits for float pixels, with test-time augmentation ``tta`` (see :data:`TTA_MODES`)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    logits = classifier.predict(pixels, batch_size=batch_size, verbose=0)
    if tta == "flip":
        logits = (logits + classifier.predict(pixels[:, :, ::-1], batch_size=batch_size, verbose=0)) / 2.0
    return logits


def build_served_model(classifier: keras.Model, temperature: float = 1.0, tta: str = "none") -> keras.Model:
    """Wrap a trained classifier into the served model.

    The served model takes ``uint8`` pixels ``[batch, H, W, 3]`` (4× fewer bytes on the wire than
    float32), casts them, and returns temperature-scaled softmax probabilities and the Grad-CAM map of
    every class (see :class:`GradCamHead`).

    Args:
        classifier: the model from :func:`build_classifier`, trained.
        temperature: the calibration temperature fitted on validation (> 0).
        tta: ``flip`` averages the logits of the image and of its left-right mirror (twice the compute);
            the Grad-CAM maps stay those of the image as sent, so that they line up with it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    size = classifier.input_shape[1]
    pixels = keras.Input((size, size, CHANNELS), dtype="uint8", name=INPUT_NAME)
    floats = keras.ops.cast(pixels, "float32")
    head = GradCamHead(classifier.get_layer("head_dense"), classifier.get_layer("logits"), name="gradcam_head")
    if tta == "flip":
        # One backbone pass over [images; mirrors]: two branches sharing weights would keep ONNX Runtime
        # from fusing BatchNorm into the convolutions (measured 3.3x slower than one pass, not 2x).
        logits, cams = head(feature_model(classifier)(MirroredBatch()(floats), training=False))
        logits, cams = BatchHalves(mean=True)(logits), BatchHalves(mean=False)(cams)
    else:
        logits, cams = head(feature_model(classifier)(floats, training=False))
    scaled = keras.ops.divide(logits, np.float32(temperature))
    probabilities = keras.layers.Softmax(name=OUTPUT_NAME)(scaled)
    heatmap = keras.layers.Identity(name=HEATMAP_NAME)(cams)
    return keras.Model(pixels, [probabilities, heatmap], name="braintumor_served")
