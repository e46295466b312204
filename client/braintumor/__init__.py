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

from braintumor._core import ServedModel, Strategy
from braintumor.aio import AsyncTumorClassifier
from braintumor.classifier import TumorClassifier
from braintumor.config import DEFAULT_URL, IMAGE_SIZE, LABELS, MODEL_NAME, NO_TUMOR_LABEL
from braintumor.errors import (
    BrainTumorError,
    DeadlineExceededError,
    InferenceError,
    InvalidImageError,
    ModelMismatchError,
    ModelNotReadyError,
    ServerUnavailableError,
    http_status,
)
from braintumor.prediction import Prediction
from braintumor.preprocessing import Preprocessing, load_image, preprocess, preprocess_batch

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
