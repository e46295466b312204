"""Helpers shared by the tests that start real servers."""

from __future__ import annotations

import shutil
from pathlib import Path

from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME
from braintumor_serving.triton import free_ports, read_metric

__all__ = ["copy_repository", "free_ports", "metric"]


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
