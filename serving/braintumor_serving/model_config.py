"""The Triton model configurations of the repository, and the files written beside a model's versions.

Both configurations are rendered here from the same constants (:mod:`braintumor.config`), so they cannot
drift apart: ``config.pbtxt`` for the official GPU container (onnxruntime backend with TensorRT) and
``configs/cpu.pbtxt`` for the embedded CPU server (``braintumor serve``; the ``onnxruntime_python`` backend
running the same ``model.onnx``). Each version's preprocessing is rendered into both as a
``preprocessing/<N>`` parameter, which the SDK reads (:mod:`braintumor.model_repository` is the read side).
``braintumor export`` calls :func:`write_model_files` when it publishes a version.
"""

from __future__ import annotations

from pathlib import Path

from braintumor.config import CHANNELS, HEATMAP_NAME, INPUT_NAME, LABELS, MAX_BATCH_SIZE, OUTPUT_NAME
from braintumor.model_repository import (
    CONFIG_FILE,
    CPU_CONFIG_NAME,
    LABELS_FILE,
    MODEL_FILE,
    PREPROCESSING_PARAMETER,
    SERVED_VERSIONS,
    read_preprocessing,
)
from braintumor.preprocessing import Preprocessing


def _preprocessing_parameters(preprocessing: dict[int, Preprocessing]) -> str:
    lines = []
    for version, spec in sorted(preprocessing.items()):
        value = spec.to_json().replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'parameters {{ key: "{PREPROCESSING_PARAMETER}{version}" value: {{ string_value: "{value}" }} }}')
    return "".join(line + "\n" for line in lines)


def _common(
    model_name: str,
    backend: str,
    image_size: int,
    max_batch_size: int,
    served_versions: int,
    heatmap_size: int,
    preprocessing: dict[int, Preprocessing] | None = None,
) -> str:
    warmups = "\n".join(
        f"""  {{
    name: "warmup_batch_{n}"
    batch_size: {n}
    inputs {{
      key: "{INPUT_NAME}"
      value {{ data_type: TYPE_UINT8 dims: [ {image_size}, {image_size}, {CHANNELS} ] random_data: true }}
    }}
  }},"""
        for n in (1, max_batch_size)
    ).rstrip(",")
    return f"""name: "{model_name}"
backend: "{backend}"
default_model_filename: "{MODEL_FILE}"
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
  }},
  {{
    name: "{HEATMAP_NAME}"
    data_type: TYPE_FP32
    dims: [ {len(LABELS)}, {heatmap_size}, {heatmap_size} ]
  }}
]
version_policy: {{ latest: {{ num_versions: {served_versions} }} }}
# Not ready until every instance has run a batch of 1 and a full batch.
model_warmup [
{warmups}
]
# The preprocessing each version was trained with (JSON); the braintumor SDK applies the one of the version
# it sends to.
{_preprocessing_parameters(preprocessing or {})}"""


def render_gpu_config(
    model_name: str,
    image_size: int,
    heatmap_size: int,
    max_batch_size: int = MAX_BATCH_SIZE,
    served_versions: int = SERVED_VERSIONS,
    preprocessing: dict[int, Preprocessing] | None = None,
) -> str:
    """``config.pbtxt`` for the official Triton container: onnxruntime backend, TensorRT accelerator."""
    return (
        "# GPU Triton (official container): ONNX Runtime with the TensorRT execution provider.\n"
        + _common(model_name, "onnxruntime", image_size, max_batch_size, served_versions, heatmap_size, preprocessing)
        + """instance_group [ { count: 2, kind: KIND_GPU } ]
dynamic_batching {
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 1000
  default_queue_policy {
    max_queue_size: 512
    timeout_action: REJECT
    default_timeout_microseconds: 2000000
    allow_timeout_override: true
  }
}
optimization {
  execution_accelerators {
    gpu_execution_accelerator: [
      {
        name: "tensorrt"
        # FP32 until FP16 parity with the published metrics is verified on the target GPU.
        parameters { key: "precision_mode" value: "FP32" }
        parameters { key: "max_workspace_size_bytes" value: "1073741824" }
        parameters { key: "trt_engine_cache_enable" value: "1" }
        parameters { key: "trt_engine_cache_path" value: "/tmp/triton-trt-cache" }
      }
    ]
  }
}
"""
    )


def render_cpu_config(
    model_name: str,
    image_size: int,
    heatmap_size: int,
    max_batch_size: int = MAX_BATCH_SIZE,
    served_versions: int = SERVED_VERSIONS,
    instances: int = 2,
    intra_op_threads: int = 1,
    preprocessing: dict[int, Preprocessing] | None = None,
) -> str:
    """``configs/cpu.pbtxt`` for the embedded CPU server (python-based ``onnxruntime_python`` backend).

    Two single-threaded instances measured faster than one two-threaded instance on two cores (while one
    instance copies tensors in and out, the other computes), and a queue delay only added latency; see
    ``docs/serving.md``.
    """
    return (
        "# Embedded CPU Triton (braintumor serve): the same model.onnx through ONNX Runtime in the python backend.\n"
        + _common(
            model_name, "onnxruntime_python", image_size, max_batch_size, served_versions, heatmap_size, preprocessing
        )
        + f"""instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]
# No queue delay: a request runs at once when the instance is idle (low latency at low load); while it is
# busy, the requests that arrive queue up and run together as the next batch (throughput at high load).
# Overload: at most 128 requests wait (more are refused at once with UNAVAILABLE, which clients retry
# with backoff) and none waits more than 2 s; latency stays bounded instead of growing without limit.
dynamic_batching {{
  max_queue_delay_microseconds: 0
  default_queue_policy {{
    max_queue_size: 128
    timeout_action: REJECT
    default_timeout_microseconds: 2000000
    allow_timeout_override: true
  }}
}}
parameters {{ key: "intra_op_num_threads" value: {{ string_value: "{intra_op_threads}" }} }}
parameters {{ key: "graph_optimization_level" value: {{ string_value: "all" }} }}
# Requests that ask only for the probabilities run a second session cut down to them: ONNX Runtime computes
# every output of a graph at every call, and the Grad-CAM branch costs about 15 % of each batch.
parameters {{ key: "lean_outputs" value: {{ string_value: "{OUTPUT_NAME}" }} }}
"""
    )


def write_model_files(
    model_dir: Path,
    model_name: str,
    image_size: int,
    heatmap_size: int,
    served_versions: int = SERVED_VERSIONS,
    new_versions: dict[int, Preprocessing] | None = None,
) -> None:
    """Write ``labels.txt``, ``config.pbtxt`` (GPU) and ``configs/cpu.pbtxt`` beside the model's versions.

    Args:
        model_dir: the model's folder in the repository.
        model_name: the model's name.
        image_size: side of the model's square input.
        heatmap_size: side of the Grad-CAM grid the model outputs.
        served_versions: how many of the latest versions Triton serves side by side.
        new_versions: preprocessing of versions about to be published (not in ``model_dir`` yet).
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / LABELS_FILE).write_text("\n".join(LABELS) + "\n")
    preprocessing = {**read_preprocessing(model_dir, image_size), **(new_versions or {})}
    gpu = render_gpu_config(
        model_name, image_size, heatmap_size, served_versions=served_versions, preprocessing=preprocessing
    )
    cpu = render_cpu_config(
        model_name, image_size, heatmap_size, served_versions=served_versions, preprocessing=preprocessing
    )
    (model_dir / CONFIG_FILE).write_text(gpu)
    (model_dir / "configs").mkdir(exist_ok=True)
    (model_dir / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").write_text(cpu)
