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
