"""The versioned Triton model repository: layout, versions, labels and model configuration.

Layout (one folder per model)::

    model_repository/<model>/
        config.pbtxt     # Triton model configuration
        labels.txt       # one label per line, in output order (Triton's classification extension)
        <N>/model.onnx   # version N: uint8 pixels in, calibrated probabilities out
        <N>/model-card.md, <N>/metrics.json
"""

from __future__ import annotations

from pathlib import Path

from braintumor.config import CHANNELS, INPUT_NAME, LABELS, MAX_BATCH_SIZE, OUTPUT_NAME

LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"


def versions(model_dir: Path) -> list[int]:
    """The published version numbers of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: Path) -> int:
    """The version number the next export will publish."""
    published = versions(model_dir)
    return published[-1] + 1 if published else 1


def render_config(model_name: str, image_size: int, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """The Triton model configuration for an ONNX classifier served by the onnxruntime backend."""
    return f"""name: "{model_name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {image_size}, {image_size}, {CHANNELS} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {len(LABELS)} ]
    label_filename: "{LABELS_FILE}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 500
}}
version_policy: {{ latest: {{ num_versions: 2 }} }}
"""


def write_model_files(model_dir: Path, model_name: str, image_size: int) -> None:
    """Write ``labels.txt`` and ``config.pbtxt`` beside the model's versions."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / LABELS_FILE).write_text("\n".join(LABELS) + "\n")
    (model_dir / CONFIG_FILE).write_text(render_config(model_name, image_size))
