"""The PACS worker's exceptions: one small named type per way a series or the worker can fail.

Every message is safe to log: it names series and slices by hashed identifiers or positions, never by
patient names, IDs, dates or UIDs.
"""

from __future__ import annotations

from braintumor.errors import BrainTumorError


class PacsError(BrainTumorError):
    """Base of the PACS worker's errors."""


class OrthancUnavailableError(PacsError, ConnectionError, status="UNAVAILABLE"):
    """Orthanc cannot be reached, or refuses the credentials: nothing can be read or written."""


class OrthancRequestError(PacsError, status="FAILED_PRECONDITION"):
    """Orthanc answered a request with an error (a series deleted meanwhile, a refused store, …)."""


class UnsupportedSeriesError(PacsError, status="INVALID_ARGUMENT"):
    """The series is not one the model is for (not MR, multi-frame objects, no images): it is skipped."""


class UnreadableSliceError(PacsError, status="INVALID_ARGUMENT"):
    """A slice of the series cannot be read or decoded (corrupt file, compressed pixel data no installed
    decoder reads): the series fails, since a result without that slice could miss a tumour."""


class ClassifierUnavailableError(PacsError, status="UNAVAILABLE"):
    """Triton did not answer, after the retries with backoff: the series fails and can be retried later."""


class ClassificationError(PacsError, status="INTERNAL"):
    """Triton answered but refused the request, or serves a model this SDK cannot use: the series fails."""


class ResultWriteError(PacsError, status="INTERNAL"):
    """The result (SR and Secondary Capture) could not be built or stored."""


class StateMismatchError(PacsError, status="FAILED_PRECONDITION"):
    """The state file belongs to another Orthanc: mixing them would lose or repeat series."""


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
