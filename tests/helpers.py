"""Helpers shared by the tests: a copy of the committed repository, free ports, metrics, eager training."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME
from braintumor_serving.triton import free_ports, read_metric

__all__ = ["copy_repository", "eager_training", "free_ports", "metric"]


def copy_repository(destination: Path, extra_versions: int = 0, keep: tuple[int, ...] | None = None) -> Path:
    """Copy the committed model repository.

    Args:
        destination: the copy's folder.
        extra_versions: this many more versions repeat the latest one kept.
        keep: keep only these versions (``-1`` is the latest); all when ``None``.
    """
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, destination)
    model_dir = destination / MODEL_NAME
    published = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    latest = published[-1]
    if keep is not None:
        wanted = {latest if v == -1 else v for v in keep}
        for version in set(published) - wanted:
            shutil.rmtree(model_dir / str(version))
        latest = max(wanted & set(published))
    for k in range(1, extra_versions + 1):
        shutil.copytree(model_dir / str(latest), model_dir / str(latest + k))
    return destination


metric = read_metric


@contextlib.contextmanager
def eager_training() -> Iterator[None]:
    """Run Keras' train and test steps eagerly inside the block (in this process).

    Tracing MobileNetV3Small's steps into graphs costs about 25 s a run on these 2 cores, while a tiny run's
    steps take a few seconds (eager steps cost more each: a run of many small batches is faster traced).
    Tests whose point is what a flag does (weights that moved or were weighted, a soup's ingredients) train
    inside this block; the graph path users run stays covered by the tests that train without it
    (``test_train_export``'s tiny run, ``--ema``, resuming after a kill, the shared-data smoke run, int8).
    """
    import tensorflow as tf

    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(before)
