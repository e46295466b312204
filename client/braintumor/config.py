"""One place for the constants that training, export, serving and clients must agree on.

Everything that has to match between the training pipeline and a served model version (labels,
image size, tensor names) is defined here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

#: Class labels, in the order of the model's output vector (alphabetical, as the dataset folders).
LABELS: Final[tuple[str, ...]] = ("glioma", "meningioma", "notumor", "pituitary")
#: The label that means "no tumor"; every other label is a tumor.
NO_TUMOR_LABEL: Final[str] = "notumor"
NO_TUMOR_INDEX: Final[int] = LABELS.index(NO_TUMOR_LABEL)

#: Side of the square image the model takes, in pixels.
IMAGE_SIZE: Final[int] = 160
#: Channels the model takes (the grey MRI slice repeated three times, as MobileNetV3 expects).
CHANNELS: Final[int] = 3

#: The served model's gRPC address (``host:port``) that clients use unless told otherwise: ``braintumor serve``
#: listens there by default.
DEFAULT_URL: Final[str] = "127.0.0.1:8001"

#: Name of the model in the Triton repository.
MODEL_NAME: Final[str] = "braintumor"
#: Input tensor: uint8 pixels, shape [batch, IMAGE_SIZE, IMAGE_SIZE, CHANNELS].
INPUT_NAME: Final[str] = "image"
#: Output tensor: float32 calibrated class probabilities, shape [batch, len(LABELS)].
OUTPUT_NAME: Final[str] = "probabilities"
#: Output tensor: float32 Grad-CAM maps of every class, shape [batch, len(LABELS), h, w], each scaled to [0, 1]
#: (h × w is the last convolution's grid: 5 × 5 for a 160-pixel input).
HEATMAP_NAME: Final[str] = "heatmap"
#: Output tensor, only in a canary's configuration (``braintumor serve --canary N``): int32, shape [batch, 1], the
#: model version whose graph computed each image's answer (the routing version has some of its requests answered
#: by the candidate). The SDK asks for it when the model serves it, and reports it as the prediction's
#: ``model_version``. (Triton 2.51's python backend cannot set response parameters, hence a tensor.)
ANSWERED_BY_OUTPUT: Final[str] = "answered_by"
#: Largest batch a served model accepts.
MAX_BATCH_SIZE: Final[int] = 32

#: The project root when running from a checkout (the folder holding model_repository/).
PROJECT_ROOT: Final[Path] = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY: Final[Path] = PROJECT_ROOT / "model_repository"
DEFAULT_TFSERVING_BASE: Final[Path] = PROJECT_ROOT / "deploy" / "tfserving" / "models"
DEFAULT_DATA_DIR: Final[Path] = PROJECT_ROOT.parent / "shared" / "data" / "brain-tumor-mri"

#: Image file suffixes read from a folder-per-class dataset.
IMAGE_SUFFIXES: Final[frozenset[str]] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
