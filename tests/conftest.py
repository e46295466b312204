from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from braintumor.config import DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared MRI dataset beside the project; tests needing it skip with the reason when absent."""
    if not (DEFAULT_DATA_DIR / "Training").is_dir() or not (DEFAULT_DATA_DIR / "Testing").is_dir():
        pytest.skip(f"the shared MRI dataset is not at {DEFAULT_DATA_DIR} (see README: Data)")
    return DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """A real embedded Triton server on free loopback ports, serving a copy of the committed repository:
    two versions side by side, each with its own preprocessing: version 1 (a plain resize) and the latest
    (crop to the head and intensity stretch). The versions between them are left out of the copy, so that the
    two that the configuration serves (the latest two present) differ in preprocessing."""
    pytest.importorskip("pytriton")
    from helpers import copy_repository, free_ports

    from braintumor_serving.triton import ServerConfig, TritonServer

    repository = copy_repository(tmp_path_factory.mktemp("repo") / "model_repository", keep=(1, -1))
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with TritonServer(config) as running:
        running.wait_until_ready(180)
        yield running
