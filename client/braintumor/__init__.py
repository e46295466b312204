"""braintumor: the client SDK of a brain-tumor MRI classifier served by Triton Inference Server.

This package is the client side and the lowest layer of the project: the constants every side agrees on
(:mod:`~braintumor.config`), the preprocessing training uses too, the synchronous and asyncio gRPC clients
over one shared core, their errors, the model repository's read side, and the ``braintumor`` command (which
finds the training and serving commands when their packages are installed). It installs without
TensorFlow and imports nothing from :mod:`braintumor_training` or :mod:`braintumor_serving`.

Example::

    from braintumor import TumorClassifier

    with TumorClassifier() as classifier:  # DEFAULT_URL, the latest served version
        print(classifier.predict("scan.jpg").label)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from braintumor.config import DEFAULT_URL, IMAGE_SIZE, LABELS, MODEL_NAME, NO_TUMOR_LABEL
from braintumor.errors import (
    BrainTumorError,
    DeadlineExceededError,
    InferenceError,
    InvalidImageError,
    InvalidTargetError,
    ModelMismatchError,
    ModelNotReadyError,
    ServerUnavailableError,
    http_status,
)
from braintumor.prediction import Prediction
from braintumor.preprocessing import Preprocessing, load_image, preprocess, preprocess_batch

if TYPE_CHECKING:
    from braintumor._core import ServedModel, Strategy
    from braintumor.aio import AsyncTumorClassifier
    from braintumor.classifier import TumorClassifier

#: The clients, imported on first use: ``import braintumor.config`` (training, the server launcher) then does not
#: load gRPC and tritonclient.
_LAZY = {
    "AsyncTumorClassifier": "braintumor.aio",
    "ServedModel": "braintumor._core",
    "Strategy": "braintumor._core",
    "TumorClassifier": "braintumor.classifier",
}


def __getattr__(name: str) -> Any:
    """The clients of :data:`__all__`, imported when first asked for.

    Args:
        name: the attribute asked for.
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'braintumor' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "IMAGE_SIZE",
    "LABELS",
    "MODEL_NAME",
    "NO_TUMOR_LABEL",
    "AsyncTumorClassifier",
    "BrainTumorError",
    "DeadlineExceededError",
    "InferenceError",
    "InvalidImageError",
    "InvalidTargetError",
    "ModelMismatchError",
    "ModelNotReadyError",
    "Prediction",
    "Preprocessing",
    "ServedModel",
    "ServerUnavailableError",
    "Strategy",
    "TumorClassifier",
    "__version__",
    "http_status",
    "load_image",
    "preprocess",
    "preprocess_batch",
]
