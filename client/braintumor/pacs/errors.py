"""The PACS worker's exceptions: one small named type per way a series or the worker can fail.

Every message is safe to log: it names series and slices by hashed identifiers or positions, never by
patient names, IDs, dates or UIDs.
"""

from __future__ import annotations

from braintumor.errors import BrainTumorError


class PacsError(BrainTumorError):
    """Base of the PACS worker's errors."""


class OrthancUnavailableError(PacsError, ConnectionError):
    """Orthanc cannot be reached, or refuses the credentials: nothing can be read or written."""

    status = "UNAVAILABLE"


class OrthancRequestError(PacsError):
    """Orthanc answered a request with an error (a series deleted meanwhile, a refused store, …)."""

    status = "FAILED_PRECONDITION"


class UnsupportedSeriesError(PacsError):
    """The series is not one the model is for (not MR, multi-frame objects, no images): it is skipped."""

    status = "INVALID_ARGUMENT"


class UnreadableSliceError(PacsError):
    """A slice of the series cannot be read or decoded (corrupt file, compressed pixel data no installed
    decoder reads): the series fails, since a result without that slice could miss a tumour."""

    status = "INVALID_ARGUMENT"


class ClassifierUnavailableError(PacsError):
    """Triton did not answer, after the retries with backoff: the series fails and can be retried later."""

    status = "UNAVAILABLE"


class ClassificationError(PacsError):
    """Triton answered but refused the request, or serves a model this SDK cannot use: the series fails."""

    status = "INTERNAL"


class ResultWriteError(PacsError):
    """The result (SR and Secondary Capture) could not be built or stored."""

    status = "INTERNAL"


class StateMismatchError(PacsError):
    """The state file belongs to another Orthanc: mixing them would lose or repeat series."""

    status = "FAILED_PRECONDITION"


__all__ = [
    "ClassificationError",
    "ClassifierUnavailableError",
    "OrthancRequestError",
    "OrthancUnavailableError",
    "PacsError",
    "ResultWriteError",
    "StateMismatchError",
    "UnreadableSliceError",
    "UnsupportedSeriesError",
]
