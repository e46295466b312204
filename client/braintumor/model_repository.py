"""The versioned Triton model repository: layout, versions, labels and model configurations.

Layout (one folder per model)::

    model_repository/<model>/
        config.pbtxt        # GPU Triton container: onnxruntime backend with the TensorRT accelerator
        configs/cpu.pbtxt   # embedded CPU server (tritonserver --model-config-name=cpu): the
                            # onnxruntime_python backend, running the same model.onnx
        labels.txt          # one label per line, in output order (Triton's classification extension)
        <N>/model.onnx      # version N: uint8 pixels in, calibrated probabilities out
        <N>/preprocessing.json  # the preprocessing version N was trained with (braintumor.preprocessing)
        <N>/model-card.md, <N>/metrics.json

This is the read side, all a client needs: the layout, the published versions and each version's
preprocessing. Both configurations are rendered from the same constants by the serving package
(:mod:`braintumor_serving.model_config`, which ``braintumor export`` calls), so they cannot drift apart. Each
version's ``preprocessing.json`` is also rendered into both as a ``preprocessing/<N>`` parameter
(:data:`PREPROCESSING_PARAMETER`): Triton's model configuration is shared by all versions, and this is how a
client learns, from the server alone, the preprocessing of the version it talks to.
"""

from __future__ import annotations

from pathlib import Path

from braintumor.preprocessing import Preprocessing

LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
CPU_CONFIG_NAME = "cpu"
MODEL_FILE = "model.onnx"
PREPROCESSING_FILE = "preprocessing.json"
#: Prefix of the model configuration parameters that carry each version's preprocessing.
PREPROCESSING_PARAMETER = "preprocessing/"
#: Versions served side by side by default (Triton version policy ``latest``).
SERVED_VERSIONS = 2
#: Version numbers from here on are reserved for the canary's routing version (``ROUTING_VERSION_BASE +
#: primary``, see ``braintumor serve --canary``): :func:`next_version` never publishes one, so a client that
#: cached a routing version never meets a published version of the same number.
ROUTING_VERSION_BASE = 1_000_000


def versions(model_dir: Path) -> list[int]:
    """The published version numbers of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: Path) -> int:
    """The version number the next export will publish (one above the published versions, ignoring any folder at
    or above :data:`ROUTING_VERSION_BASE`, a number reserved for the canary's routing version).

    Args:
        model_dir: the model's folder in the repository.

    Raises:
        ValueError: when the next number would reach :data:`ROUTING_VERSION_BASE`.
    """
    published = [v for v in versions(model_dir) if v < ROUTING_VERSION_BASE]
    version = published[-1] + 1 if published else 1
    if version >= ROUTING_VERSION_BASE:
        raise ValueError(f"version {version} is reserved for the canary's routing versions (≥ {ROUTING_VERSION_BASE})")
    return version


def read_preprocessing(model_dir: Path, image_size: int) -> dict[int, Preprocessing]:
    """Each published version's preprocessing (a version without ``preprocessing.json``: a plain resize)."""
    found = {}
    for version in versions(model_dir):
        path = model_dir / str(version) / PREPROCESSING_FILE
        found[version] = Preprocessing.from_json(path.read_text()) if path.exists() else Preprocessing(image_size)
    return found
