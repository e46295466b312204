import numpy as np
import pytest

from synthetic import make_dataset

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from braintumor.config import LABELS
from braintumor.preprocessing import preprocess
from braintumor_training.dataset import load_arrays, scan_dataset
from braintumor_training.model import BN_MOMENTUM, build_classifier, build_served_model, tta_logits
from braintumor_training.train import CollapseGuard
from braintumor_training.train import make_dataset as make_tf_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("pipe"), {"Training": 5, "Testing": 1}, seed=7)
    return root, scan_dataset(root)


def test_training_arrays_are_the_sdk_preprocessing_bit_exact(data):
    root, records = data
    pixels, labels = load_arrays(root, records, 64)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(records), 64, 64, 3)
    for i, r in enumerate(records):
        assert np.array_equal(pixels[i], preprocess(root / r.path, 64))
        assert LABELS[labels[i]] == r.label


def test_tf_dataset_shapes_dtypes_and_augmentation_range(data):
    root, records = data
    pixels, labels = load_arrays(root, records, 64)
    train = make_tf_dataset(pixels, labels, 8, training=True, seed=1)
    x, y = next(iter(train))
    assert x.shape == (8, 64, 64, 3) and x.dtype == tf.float32
    assert y.shape == (8, len(LABELS)) and np.allclose(y.numpy().sum(axis=1), 1.0)
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0 + 1e-3
    val = make_tf_dataset(pixels, labels, 8, training=False, seed=1)
    x_val, _ = next(iter(val))
    assert np.array_equal(x_val.numpy(), pixels[:8].astype(np.float32))  # no augmentation, no shuffle


@pytest.mark.slow  # builds a Keras MobileNetV3Small
def test_classifier_has_fast_batchnorm_and_served_model_returns_probabilities():
    model = build_classifier(32)
    momenta = [
        layer.momentum for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert momenta and all(m == BN_MOMENTUM for m in momenta)
    served = build_served_model(model, temperature=2.0)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    p, heatmap = served.predict(x, verbose=0)
    assert p.shape == (3, len(LABELS)) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert heatmap.shape[:2] == (3, len(LABELS)) and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    logits = model.predict(x.astype(np.float32), verbose=0)
    expected = tf.nn.softmax(logits / 2.0).numpy()
    assert np.allclose(p, expected, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        build_served_model(model, temperature=0.0)


@pytest.mark.slow  # builds a Keras MobileNetV3Small
def test_flip_test_time_augmentation_averages_the_mirror_and_keeps_the_maps_of_the_image():
    model = build_classifier(32)
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for _ in range(40):  # BatchNorm statistics of these images: an untrained model answers 0.25 otherwise
        model(x.astype(np.float32), training=True)
    plain = build_served_model(model, temperature=2.0)
    tta = build_served_model(model, temperature=2.0, tta="flip")
    p, heatmap = tta.predict(x, verbose=0)
    logits = tta_logits(model, x.astype(np.float32), "flip")
    assert np.allclose(p, tf.nn.softmax(logits / 2.0).numpy(), atol=1e-5)
    assert np.allclose(tta.predict(x[:, :, ::-1], verbose=0)[0], p, atol=1e-5)  # mirror-invariant
    assert not np.allclose(plain.predict(x, verbose=0)[0], p, atol=1e-5)
    assert np.allclose(plain.predict(x, verbose=0)[1], heatmap, atol=1e-5)
    with pytest.raises(ValueError, match="tta"):
        build_served_model(model, tta="rotate")


def test_collapse_guard_stops_a_constant_model_and_spares_a_varied_one():
    inputs = keras.Input((4,))
    constant = keras.Model(inputs, keras.layers.Dense(4, kernel_initializer="zeros")(inputs))
    probe = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    guard = CollapseGuard(probe, grace_epochs=3, patience=3)
    guard.set_model(constant)
    for epoch in range(3):
        guard.on_epoch_end(epoch, {})
    assert guard.collapsed and constant.stop_training
    init = keras.initializers.RandomNormal(stddev=2.0, seed=1)
    varied = keras.Model(inputs, keras.layers.Dense(4, kernel_initializer=init)(inputs))
    guard = CollapseGuard(probe, grace_epochs=1, patience=1)
    guard.set_model(varied)
    logs: dict = {}
    guard.on_epoch_end(0, logs)
    assert not guard.collapsed and logs["probe_std"] > 0.01


@pytest.mark.slow  # builds a Keras MobileNetV3Small
def test_backbone_starts_from_a_local_weights_file(tmp_path):
    donor = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None, pooling="avg", include_preprocessing=True
    )
    path = tmp_path / "backbone.weights.h5"
    donor.save_weights(path)
    model = build_classifier(32, weights=path)
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    for mine, theirs in zip(backbone.get_weights(), donor.get_weights(), strict=True):
        assert np.array_equal(mine, theirs)


def test_robust_augmentation_is_seeded_bounded_and_varied(data):
    from braintumor_training.augment import RandomBiasField, RandomGamma, build_augmenter

    root, records = data
    pixels, labels = load_arrays(root, records, 64)
    batch = tf.constant(pixels.astype(np.float32))
    first = build_augmenter(7, "robust")(batch).numpy()
    again = build_augmenter(7, "robust")(batch).numpy()
    assert np.array_equal(first, again)  # every transform has its own seeded generator
    assert first.shape == pixels.shape and first.min() >= 0.0 and first.max() <= 255.0
    assert np.abs(first - pixels).mean() > 5.0  # strong, not mild
    gamma = RandomGamma(0.5, 0.5, probability=1.0, seed=1)(batch).numpy()
    assert np.allclose(gamma, 255.0 * (pixels / 255.0) ** 0.5, atol=1e-3)
    assert np.array_equal(RandomBiasField(probability=0.0, seed=1)(batch).numpy(), pixels.astype(np.float32))
    dataset = make_tf_dataset(pixels, labels, 8, training=True, seed=1, augmentation="robust")
    x, _ = next(iter(dataset))  # runs inside tf.data's graph
    assert x.shape == (8, 64, 64, 3)
    with pytest.raises(ValueError, match="profile"):
        build_augmenter(1, "extreme")
