"""braintumor: a brain-tumor MRI classifier served by Triton Inference Server.

This package is the client side (preprocessing, labels, the CLI); it installs without TensorFlow.
Training lives in :mod:`braintumor_training`, installed with the ``train`` extra.
"""

from braintumor.config import IMAGE_SIZE, LABELS, MODEL_NAME, NO_TUMOR_LABEL
from braintumor.preprocessing import InvalidImageError, Preprocessing, load_image, preprocess, preprocess_batch

__version__ = "0.1.0"

__all__ = [
    "IMAGE_SIZE",
    "LABELS",
    "MODEL_NAME",
    "NO_TUMOR_LABEL",
    "InvalidImageError",
    "Preprocessing",
    "load_image",
    "preprocess",
    "preprocess_batch",
]
