"""``train --ema``: the averaged weights are what a run keeps, also when it stops early."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras

from braintumor_training.train import AveragedWeights


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def _fit(epochs: int, swap: keras.callbacks.Callback, stop_early: bool = False) -> np.ndarray:
    """A tiny model's kernel after ``fit`` with an averaging optimizer (16 steps an epoch)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.AdamW(0.05, use_ema=True, ema_momentum=0.9), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
    callbacks = [*([_StopAfterFirstEpoch()] if stop_early else []), swap]  # the stop comes first, as in train()
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return model.layers[0].kernel.numpy()


def test_an_early_stop_keeps_the_averaged_weights_as_the_last_epoch_does():
    averaged = _fit(1, AveragedWeights())  # one epoch of one: Keras' own path hands over the average
    np.testing.assert_allclose(_fit(1, keras.callbacks.SwapEMAWeights(swap_on_epoch=True)), averaged, atol=1e-6)
    # stopped after the first of three epochs: Keras' callback alone leaves the raw weights in the model
    raw = _fit(3, keras.callbacks.SwapEMAWeights(swap_on_epoch=True), stop_early=True)
    assert np.abs(raw - averaged).max() > 1e-3
    np.testing.assert_allclose(_fit(3, AveragedWeights(), stop_early=True), averaged, atol=1e-6)
