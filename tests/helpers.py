"""Helpers shared by the tests that start real servers."""

from __future__ import annotations

import shutil
from pathlib import Path

from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME
from braintumor_serving.triton import free_ports, read_metric

__all__ = ["copy_repository", "free_ports", "metric"]


def copy_repository(destination: Path, extra_versions: int = 0) -> Path:
    """Copy the committed model repository; ``extra_versions`` more versions repeat the latest one."""
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, destination)
    model_dir = destination / MODEL_NAME
    latest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    for k in range(1, extra_versions + 1):
        shutil.copytree(model_dir / str(latest), model_dir / str(latest + k))
    return destination


metric = read_metric
