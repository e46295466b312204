"""Reading one series from Orthanc and classifying every slice of it through Triton with the SDK.

Only pixels go to Triton: each slice is decoded and preprocessed here by the SDK (the served version's own
preprocessing) and sent as a uint8 tensor; no DICOM header leaves this process. A series is either
classified whole, or not at all: a slice that cannot be read fails the series, since a result without it
could miss a tumour.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, MRImageStorage

from braintumor.classifier import TumorClassifier
from braintumor.errors import (
    BrainTumorError,
    DeadlineExceededError,
    InvalidImageError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from braintumor.pacs.errors import (
    ClassificationError,
    ClassifierUnavailableError,
    UnreadableSliceError,
    UnsupportedSeriesError,
)
from braintumor.pacs.orthanc import OrthancClient
from braintumor.prediction import Prediction

log = logging.getLogger("braintumor.pacs")

#: SOP classes of MR images that hold many frames in one object (not classified: one slice per object).
MULTIFRAME_MR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)

#: Errors of the SDK that mean "Triton is not there now": worth retrying later.
UNAVAILABLE = (ServerUnavailableError, ModelNotReadyError, DeadlineExceededError)

__all__ = [
    "SeriesResult",
    "Slice",
    "classify_series",
    "fingerprint",
    "read_series",
    "tag",
]


def tag(identifier: str) -> str:
    """A short one-way hash of an identifier: how logs and reasons name a series.

    Args:
        identifier: Orthanc's series ID (or any identifier).
    """
    return hashlib.sha256(identifier.encode()).hexdigest()[:12]


def fingerprint(instance_ids: Sequence[str]) -> str:
    """A hash of a series' instance set: it changes when an instance comes or goes, not with their order.

    Args:
        instance_ids: Orthanc's IDs of the series' instances.
    """
    return hashlib.sha256("\n".join(sorted(instance_ids)).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Slice:
    """One slice of a series: its header (for references), its encoded file (for the pixels), its place.

    Args:
        position: 1-based place in the series, ordered by instance number.
        header: the DICOM header without pixel data.
        data: the whole DICOM file as stored.
    """

    position: int
    header: Dataset
    data: bytes


@dataclass(frozen=True)
class SeriesResult:
    """Every slice's prediction, and the slice that drives the series' result.

    The series is as suspicious as its most suspicious slice: the series' tumour probability is the highest
    tumour probability of its slices, and its most likely class that slice's most likely class.
    """

    slices: tuple[Slice, ...]
    predictions: tuple[Prediction, ...]
    model_name: str
    model_version: str

    @property
    def top(self) -> int:
        """Index of the slice with the highest tumour probability (the first of equals)."""
        return int(np.argmax([p.tumor_probability for p in self.predictions]))

    @property
    def top_prediction(self) -> Prediction:
        return self.predictions[self.top]

    @property
    def tumor_probability(self) -> float:
        return self.top_prediction.tumor_probability

    @property
    def label(self) -> str:
        return self.top_prediction.label


def _read_header(data: bytes, position: int, count: int) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as err:
        raise UnreadableSliceError(
            f"slice {position} of {count} is not a readable DICOM file ({type(err).__name__})"
        ) from err


def _check_slice(header: Dataset, data: bytes, position: int, count: int) -> None:
    where = f"slice {position} of {count}"
    modality = str(header.get("Modality", ""))
    if modality != "MR":
        raise UnsupportedSeriesError(f"{where} is modality {modality or 'unknown'}, not MR")
    sop_class = str(header.get("SOPClassUID", ""))
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if sop_class in MULTIFRAME_MR_CLASSES or frames > 1:
        raise UnsupportedSeriesError(
            f"{where} is a multi-frame object ({UID(sop_class).name}, {frames} frames): "
            "only single-slice MR images are classified"
        )
    if sop_class != MRImageStorage:
        raise UnsupportedSeriesError(
            f"{where} is {UID(sop_class).name or 'an unknown SOP class'}, not MR Image Storage"
        )
    if b"\xe0\x7f\x10\x00" not in data:  # (7FE0,0010) Pixel Data, little endian
        raise UnreadableSliceError(f"{where} has no pixel data")
    _check_pixel_length(header, data, where)


def _check_pixel_length(header: Dataset, data: bytes, where: str) -> None:
    """Uncompressed pixel data must be as long as rows, columns and bits say: a truncated slice is corrupt."""
    meta = getattr(header, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not syntax or syntax.is_compressed:
        return
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        bits, samples = int(header.BitsAllocated), int(header.get("SamplesPerPixel", 1) or 1)
        pixels = pydicom.dcmread(io.BytesIO(data), specific_tags=["PixelData"]).get("PixelData")
    except Exception as err:
        raise UnreadableSliceError(f"{where}: its image attributes cannot be read ({type(err).__name__})") from err
    expected = (rows * columns * samples * bits + 7) // 8
    if pixels is None or len(pixels) < expected:
        held = 0 if pixels is None else len(pixels)
        raise UnreadableSliceError(
            f"{where}: its pixel data is truncated ({held} bytes where {rows}×{columns} pixels of {bits} bits "
            f"need {expected})"
        )


def read_series(orthanc: OrthancClient, info: dict[str, Any], workers: int = 4) -> list[Slice]:
    """Download a series' instances and check they are single-frame MR slices; order them.

    Args:
        orthanc: the client.
        info: the series' resource (``OrthancClient.series``).
        workers: downloads in flight.

    Raises:
        UnsupportedSeriesError: a slice that is not a single-frame MR image (the series is skipped).
        UnreadableSliceError: a slice that is not readable DICOM or has no pixels (the series fails).
        OrthancUnavailableError, OrthancRequestError: when Orthanc does not deliver.
    """
    ids = list(info.get("Instances", []))
    if not ids:
        raise UnsupportedSeriesError("the series holds no instances")
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(ids)))) as pool:
        files = list(pool.map(orthanc.instance_file, ids))
    headers = [_read_header(data, i + 1, len(files)) for i, data in enumerate(files)]
    order = sorted(
        range(len(files)),
        key=lambda i: (int(headers[i].get("InstanceNumber", 0) or 0), str(headers[i].get("SOPInstanceUID", ""))),
    )
    slices = [Slice(k + 1, headers[i], files[i]) for k, i in enumerate(order)]
    for s in slices:
        _check_slice(s.header, s.data, s.position, len(slices))
    return slices


def _syntax(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    return syntax.name or "unknown transfer syntax"


def _preprocess(classifier: TumorClassifier, slices: Sequence[Slice], workers: int) -> np.ndarray:
    served = classifier.model or classifier.connect()

    def one(s: Slice) -> np.ndarray:
        try:
            return served.preprocessing(s.data)
        except InvalidImageError as err:
            where = f"slice {s.position} of {len(slices)}"
            if err.message.startswith("cannot decode the pixel data"):
                cause = type(err.__cause__).__name__ if err.__cause__ else "error"
                reason = f"{where}: its pixel data ({_syntax(s.header)}) cannot be decoded ({cause})"
            else:
                reason = f"{where}: {err.message.replace('<bytes>', 'the file')}"
            raise UnreadableSliceError(reason) from err

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return np.stack(list(pool.map(one, slices)))


def classify_series(
    connect: Callable[[], TumorClassifier],
    slices: Sequence[Slice],
    *,
    attempts: int = 4,
    backoff: float = 2.0,
    workers: int = 2,
    address: str = "Triton",
    sleep: Callable[[float], None] = time.sleep,
) -> SeriesResult:
    """Classify every slice, with a Grad-CAM map each, through Triton.

    Args:
        connect: gives a connected classifier (called again after Triton was unavailable).
        slices: the series' slices, in order.
        attempts: tries while Triton is unavailable, waiting ``backoff`` seconds, then twice as long each
            time (the SDK also retries each call a little).
        backoff: the first wait, in seconds.
        workers: threads decoding slices.
        address: how messages name the server (its gRPC address).
        sleep: how to wait (tests pass a fake).

    Raises:
        UnreadableSliceError: a slice whose pixels cannot be decoded (nothing was sent).
        ClassifierUnavailableError: Triton did not answer within the attempts.
        ClassificationError: Triton refused the request, or serves a model this SDK cannot use.
    """
    pixels: np.ndarray | None = None
    version: str | None = None
    last: BrainTumorError | None = None
    for attempt in range(max(1, attempts)):
        if attempt:
            wait = backoff * 2 ** (attempt - 1)
            log.warning(
                "Triton unavailable (%s); retrying in %.1f s (attempt %d of %d)", last, wait, attempt + 1, attempts
            )
            sleep(wait)
        try:
            classifier = connect()
            served = classifier.model or classifier.connect()
            if pixels is None or version != served.version:
                pixels, version = _preprocess(classifier, slices, workers), served.version
            step = max(1, served.max_batch_size)
            predictions: list[Prediction] = []
            for start in range(0, len(pixels), step):
                predictions += classifier.predict_pixels(pixels[start : start + step], explain=True)
        except UNAVAILABLE as err:
            last = err
            continue
        except UnreadableSliceError:
            raise
        except BrainTumorError as err:
            raise ClassificationError(f"Triton at {address} refused the series: {err.message}") from err
        first = predictions[0]
        return SeriesResult(tuple(slices), tuple(predictions), first.model_name, first.model_version)
    raise ClassifierUnavailableError(f"Triton at {address} unavailable after {max(1, attempts)} attempts: {last}")
