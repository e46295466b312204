"""The result written back into the study: a Comprehensive SR and a Secondary Capture, built with highdicom.

The SR follows TID 1500 (Measurement Report), as AI results usually do: one measurement group for the
series (tumour probability, most likely class, and the slice that drives them as its source image), then
one group per slice referencing that slice's SOP instance (tumour probability, each class's probability,
most likely class). Every group names the algorithm (model name and version, TID 4019), and the report
ends with the notice that it is decision support, not a diagnosis. The Secondary Capture is the Grad-CAM
overlay of the top slice, with that notice burnt in below the picture.

The UIDs of both objects are derived from the input series, its instance set and the model version
(name-based UUIDs under ``2.25``), so processing the same series again gives the same objects: a partial
write left by an interrupted worker is found and replaced, never doubled.
"""

from __future__ import annotations

import io
import math
import uuid
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from braintumor.config import LABELS
from braintumor.explain import overlay
from braintumor.pacs.series import SeriesResult
from braintumor.preprocessing import Preprocessing

#: Namespace of the name-based UUIDs that make result UIDs (fixed forever: changing it doubles results).
UID_NAMESPACE = uuid.UUID("6c0f3f3e-0d4b-5d0c-9a59-7b1f6b5c2e11")
#: Manufacturer of the result objects; the worker skips series that carry it.
MANUFACTURER = "braintumor"
#: The notice every result carries.
NOTICE = (
    "Research and clinical decision support only: produced by a machine-learning model, not a diagnosis. "
    "A qualified reader reviews every scan."
)
#: Private coding scheme of the model's own concepts (designators starting with 99 are private).
SCHEME = "99BRAINTUMOR"
TUMOR_PROBABILITY = hd.sr.CodedConcept("TUMOR-P", SCHEME, "Tumour probability")
#: The model's classes as codes: the finding (TID 1501 "Finding", 121071) of each measurement group.
CLASS_CODES = {
    "glioma": hd.sr.CodedConcept("GLIOMA", SCHEME, "Glioma"),
    "meningioma": hd.sr.CodedConcept("MENINGIOMA", SCHEME, "Meningioma"),
    "notumor": hd.sr.CodedConcept("NOTUMOR", SCHEME, "No tumour"),
    "pituitary": hd.sr.CodedConcept("PITUITARY", SCHEME, "Pituitary tumour"),
}
CLASS_PROBABILITY = {
    label: hd.sr.CodedConcept(f"{code.value}-P", SCHEME, f"Probability of {code.meaning.lower()}")
    for label, code in CLASS_CODES.items()
}
#: Procedure reported: LOINC "MR Brain".
PROCEDURE = hd.sr.CodedConcept("24590-2", "LN", "MR Brain")
#: The overlay's shorter side is brought to at least this many pixels (whole-number nearest-neighbour
#: scaling), so that the burnt-in notice stays readable.
MIN_OVERLAY_WIDTH = 384

__all__ = [
    "MANUFACTURER",
    "NOTICE",
    "ResultUids",
    "build_sc",
    "build_sr",
    "encode",
    "overlay_picture",
    "result_uids",
]


@dataclass(frozen=True)
class ResultUids:
    """The UIDs of one result: the SR's series and instance, the Secondary Capture's series and instance."""

    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str

    @property
    def instances(self) -> tuple[str, str]:
        return (self.sr_instance, self.sc_instance)


def _uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join(parts)).int}"


def result_uids(series_uid: str, fingerprint: str, model_name: str, model_version: str) -> ResultUids:
    """The deterministic UIDs of the result of one series' instance set by one model version.

    Args:
        series_uid: the input series' Series Instance UID.
        fingerprint: its instance set (:func:`braintumor.pacs.series.fingerprint`).
        model_name: the served model.
        model_version: its version.
    """
    base = (series_uid, fingerprint, model_name, model_version)
    return ResultUids(*(_uid(*base, role) for role in ("sr-series", "sr", "sc-series", "sc")))


def _algorithm(result: SeriesResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)


def _probability(name: hd.sr.CodedConcept, value: float, result: SeriesResult) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=codes.UCUM.NoUnits)


def _group(
    result: SeriesResult, index: int, identifier: str, uid: str, per_class: bool
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    prediction = result.predictions[index]
    measurements = [_probability(TUMOR_PROBABILITY, prediction.tumor_probability, result)]
    if per_class:
        measurements += [
            _probability(CLASS_PROBABILITY[label], prediction.probabilities[label], result) for label in LABELS
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        algorithm_id=_algorithm(result),
        finding_type=CLASS_CODES[prediction.label],
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(result.slices[index].header)],
    )


def _dated(dataset: Dataset) -> None:
    """Date the result's series when it was made (viewers sort and group series by it)."""
    now = datetime.now()
    dataset.SeriesDate = dataset.get("ContentDate") or now.strftime("%Y%m%d")
    dataset.SeriesTime = dataset.get("ContentTime") or now.strftime("%H%M%S")


def _coding_schemes() -> list[Dataset]:
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "braintumor model concepts"
    item.CodingSchemeResponsibleOrganization = "braintumor project"
    return [item]


def build_sr(result: SeriesResult, uids: ResultUids, series_number: int = 9001) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of a series' result (TID 1500), in the input series' study.

    Args:
        result: the classified series.
        uids: the result's UIDs (:func:`result_uids`).
        series_number: the SR series' number.
    """
    n = len(result.slices)
    top = result.top
    groups = [_group(result, top, f"series result (slice {top + 1} of {n})", _uid(uids.sr_instance, "series"), False)]
    groups += [
        _group(result, i, f"slice {i + 1} of {n}", _uid(uids.sr_instance, "slice", str(i)), True) for i in range(n)
    ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_uid(result.model_name, result.model_version, "device"),
        name=f"{result.model_name} version {result.model_version}",
        manufacturer_name=MANUFACTURER,
        model_name=result.model_name,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device),
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=None,  # the optional Image Library: its geometry would triple the build time
    )
    report[0].ContentSequence.append(hd.sr.TextContentItem(codes.DCM.Comment, NOTICE, relationship_type="CONTAINS"))
    evidence = [s.header for s in result.slices]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI result: {result.model_name} v{result.model_version} (decision support)",
    )
    _dated(sr)
    sr.ManufacturerModelName = result.model_name
    sr.SoftwareVersions = f"model version {result.model_version}"
    sr.CodingSchemeIdentificationSequence = _coding_schemes()
    return sr


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def overlay_picture(result: SeriesResult, preprocessing: Preprocessing | None) -> Image.Image:
    """The Secondary Capture's picture: the top slice's Grad-CAM overlay, scaled up by a whole factor to be
    at least :data:`MIN_OVERLAY_WIDTH` wide, above a band with the result and the notice.

    Args:
        result: the classified series.
        preprocessing: the answering version's preprocessing (its head crop places the map).
    """
    top = result.top
    prediction = result.predictions[top]
    picture = overlay(result.slices[top].data, prediction, preprocessing=preprocessing)
    factor = max(1, math.ceil(MIN_OVERLAY_WIDTH / picture.width))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    size = max(11, picture.width // 34)
    font = _font(size)
    lines = [
        f"{result.model_name} v{result.model_version}  Grad-CAM of {prediction.explained_label}  "
        f"slice {top + 1} of {len(result.slices)}",
        f"tumour probability {prediction.tumor_probability:.3f}  most likely: {prediction.label}",
        "DECISION SUPPORT ONLY - NOT A DIAGNOSIS",
    ]
    band = Image.new("RGB", (picture.width, (size + 6) * len(lines) + 8), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * (size + 6)), line, fill=(255, 255, 255) if i < 2 else (255, 210, 0), font=font)
    canvas = Image.new("RGB", (picture.width, picture.height + band.height))
    canvas.paste(picture, (0, 0))
    canvas.paste(band, (0, picture.height))
    return canvas


def _axis(vector: np.ndarray) -> str:
    """The patient direction a row or column vector points to most (DICOM letters: L/R, P/A, H/F)."""
    k = int(np.argmax(np.abs(vector)))
    return ("LR", "PA", "HF")[k][0 if vector[k] > 0 else 1]


def patient_orientation(header: Dataset) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of a slice from its Image Orientation (Patient): where its rows and
    its columns point. A slice without one is taken as axial (``L``, ``P``).

    Args:
        header: the slice's header.
    """
    try:
        cosines = np.asarray([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")
    if cosines.shape != (6,) or not np.all(np.isfinite(cosines)) or not cosines.any():
        return ("L", "P")
    return (_axis(cosines[:3]), _axis(cosines[3:]))


def build_sc(result: SeriesResult, uids: ResultUids, picture: Image.Image, series_number: int = 9002) -> hd.sc.SCImage:
    """The Secondary Capture of the overlay picture, in the input series' study.

    Args:
        result: the classified series.
        uids: the result's UIDs.
        picture: :func:`overlay_picture`.
        series_number: the Secondary Capture series' number.
    """
    top = result.slices[result.top]
    pixels = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=top.header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=patient_orientation(top.header),
        series_instance_uid=uids.sc_series,
        series_number=series_number,
        sop_instance_uid=uids.sc_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"AI overlay: {result.model_name} v{result.model_version} (decision support)",
    )
    _dated(sc)
    sc.ManufacturerModelName = result.model_name
    sc.SoftwareVersions = f"model version {result.model_version}"
    if "BodyPartExamined" in top.header:
        sc.BodyPartExamined = top.header.BodyPartExamined
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOTICE
    sc.DerivationDescription = (
        f"Grad-CAM of {result.predictions[result.top].explained_label} by {result.model_name} version "
        f"{result.model_version} over slice {result.top + 1} of {len(result.slices)}"
    )[:1024]
    source = Dataset()
    source.ReferencedSOPClassUID = top.header.SOPClassUID
    source.ReferencedSOPInstanceUID = top.header.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


def encode(dataset: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file.

    Args:
        dataset: the SR, the Secondary Capture, or any dataset with file meta information.
    """
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
