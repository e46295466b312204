"""Per-version preprocessing as a client learns it from the server's model configuration (no server needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException

from braintumor._core import check_model
from braintumor.errors import ModelNotReadyError, ServerUnavailableError, from_triton
from braintumor.preprocessing import Preprocessing
from braintumor_training.model_card import set_section

METADATA = {
    "name": "braintumor",
    "versions": ["1", "2"],
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 160, 160, 3]}],
    "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "heatmap", "datatype": "FP32", "shape": [-1, 4, 5, 5]},
    ],
}
PLAIN, CROPPED = Preprocessing(), Preprocessing(crop_to_head=True, normalize_intensity=True)


def _config(**versions: Preprocessing) -> dict:
    parameters = {f"preprocessing/{v.lstrip('v')}": {"string_value": p.to_json()} for v, p in versions.items()}
    parameters["intra_op_num_threads"] = {"string_value": "1"}
    return {"max_batch_size": 32, "parameters": parameters}


def test_the_latest_listed_version_and_its_preprocessing_are_chosen_unless_one_is_pinned():
    config = _config(v1=PLAIN, v2=CROPPED)
    latest = check_model(METADATA, config)
    assert (latest.version, latest.preprocessing) == ("2", CROPPED)
    assert latest.preprocessing_of("1") == PLAIN and latest.preprocessing_of("2") == CROPPED
    pinned = check_model(METADATA, config, "1")
    assert (pinned.version, pinned.preprocessing) == ("1", PLAIN)
    ten = check_model({**METADATA, "versions": ["9", "10"]}, _config(v9=PLAIN, v10=CROPPED))
    assert ten.version == "10"  # numeric order, not text order


def test_a_configuration_without_parameters_means_a_plain_resize():
    served = check_model(METADATA, {"max_batch_size": 32})
    assert served.version == "2" and served.preprocessing == Preprocessing(160)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config(v1=PLAIN), "declares no preprocessing for version 2"),
        (_config(v1=PLAIN, v2=Preprocessing(size=128)), "128-pixel images"),
        ({"parameters": {"preprocessing/2": {"string_value": '{"size": 160, "skull_strip": true}'}}}, "upgrade"),
        ({"parameters": {"preprocessing/2": {"string_value": "not json"}}}, "cannot be used"),
        ({"parameters": {"preprocessing/2": {"string_value": "[1, 2]"}}}, "JSON object"),
        ({"parameters": {"preprocessing/2": {"string_value": '{"crop_to_head": "false"}'}}}, "true or false"),
    ],
)
def test_unusable_or_missing_preprocessing_is_a_mismatch_not_a_guess(config, message):
    from braintumor.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match=message):
        check_model(METADATA, config)


def test_an_unloaded_version_is_model_not_ready_not_server_unavailable():
    unloaded = InferenceServerException(
        "Request for unknown model: 'braintumor' version 2 is not at ready state", status="StatusCode.UNAVAILABLE"
    )
    error = from_triton(unloaded, during="classifying")
    assert isinstance(error, ModelNotReadyError) and error.status == "UNAVAILABLE"  # still retryable
    down = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    assert isinstance(from_triton(down, during="classifying"), ServerUnavailableError)


@pytest.mark.parametrize(
    ("message", "status"),
    [("Stream removed", "StatusCode.UNKNOWN"), ("Received RST_STREAM with error code 2", "StatusCode.INTERNAL")],
)
def test_a_connection_lost_under_another_status_is_server_unavailable(message, status):
    error = from_triton(InferenceServerException(message, status=status), during="classifying")
    assert isinstance(error, ServerUnavailableError) and error.status == "UNAVAILABLE"  # retried, moved on a list
    # other UNKNOWN and INTERNAL errors stay what they were: not retried
    other = from_triton(InferenceServerException("model raised an error", status=status), during="classifying")
    assert not isinstance(other, ServerUnavailableError) and other.status == status.removeprefix("StatusCode.")


def test_model_card_section_is_inserted_before_the_limitations_and_replaced_in_place(tmp_path):
    card = tmp_path / "model-card.md"
    card.write_text("# Card\n\n## Results\n\nr\n\n### Robustness notes\n\nkeep\n\n## Known limitations\n\n- l\n")
    heading = "## Robustness"
    set_section(card, heading, "Seeded shifts.", "first table")
    once = card.read_text()
    assert once.index("## Robustness\n") < once.index("## Known limitations") and "first table" in once
    assert "### Robustness notes\n\nkeep" in once  # a sub-heading with the same words is not the section
    set_section(card, heading, "Seeded shifts.", "first table")
    assert card.read_text() == once  # idempotent
    set_section(card, heading, "Seeded shifts.", "second table")
    again = card.read_text()
    assert "second table" in again and "first table" not in again and again.count("## Robustness\n") == 1
