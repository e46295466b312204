"""A small client of Orthanc: its REST API to follow the change feed and read series, DICOMweb to write.

Reading uses Orthanc's own REST API (``/changes``, ``/series``, ``/instances/{id}/file``), since the change
feed exists only there. Results are written with STOW-RS (the DICOMweb plugin), both objects of a result in
one request: Orthanc receives the whole request before storing anything, so a worker stopped while
sending leaves nothing behind. Credentials come from the environment, never from the command line.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from braintumor.pacs.errors import OrthancRequestError, OrthancUnavailableError

#: Environment variables holding Orthanc's user name and password.
USERNAME_ENV = "ORTHANC_USERNAME"
PASSWORD_ENV = "ORTHANC_PASSWORD"

__all__ = ["PASSWORD_ENV", "USERNAME_ENV", "Change", "OrthancClient", "credentials_from_env"]


def credentials_from_env(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """Orthanc's user name and password from ``ORTHANC_USERNAME`` and ``ORTHANC_PASSWORD``.

    Args:
        environ: the environment to read (default: the process's).

    Returns:
        The pair, or ``None`` when neither is set.

    Raises:
        OrthancUnavailableError: when only one of the two is set.
    """
    env = os.environ if environ is None else environ
    user, password = env.get(USERNAME_ENV, ""), env.get(PASSWORD_ENV, "")
    if bool(user) != bool(password):
        raise OrthancUnavailableError(f"set both {USERNAME_ENV} and {PASSWORD_ENV}, or neither")
    return (user, password) if user else None


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change feed."""

    seq: int
    change_type: str
    resource_type: str
    resource_id: str


class OrthancClient:
    """Orthanc's REST API and DICOMweb, over one HTTP session.

    Args:
        url: Orthanc's base URL, e.g. ``http://127.0.0.1:8042`` (no credentials in it).
        auth: user name and password (see :func:`credentials_from_env`).
        timeout: seconds for each request.
        dicomweb_root: where the DICOMweb plugin answers.
    """

    def __init__(
        self,
        url: str,
        auth: tuple[str, str] | None = None,
        *,
        timeout: float = 30.0,
        dicomweb_root: str = "/dicom-web",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OrthancUnavailableError(f"the Orthanc URL must be http(s)://host:port, got {parts.scheme!r}")
        if parts.username or parts.password:
            raise OrthancUnavailableError(
                f"put no credentials in the Orthanc URL: set {USERNAME_ENV} and {PASSWORD_ENV} instead"
            )
        self.url = url.rstrip("/")
        #: The address without path or query, for messages.
        self.address = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        self.timeout = timeout
        self.dicomweb_root = "/" + dicomweb_root.strip("/")
        self._session = requests.Session()
        self._session.auth = auth
        self._session.trust_env = False  # no proxies or .netrc: the PACS is reached directly

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def __enter__(self) -> OrthancClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        try:
            response = self._session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as err:
            raise OrthancUnavailableError(
                f"Orthanc at {self.address} cannot be reached ({what}): {type(err).__name__}"
            ) from err
        if response.status_code in (401, 403):
            raise OrthancUnavailableError(
                f"Orthanc at {self.address} refused the credentials ({response.status_code}): "
                f"set {USERNAME_ENV} and {PASSWORD_ENV}"
            )
        if response.status_code in (502, 503, 504):
            raise OrthancUnavailableError(
                f"Orthanc at {self.address} is unavailable ({what}): HTTP {response.status_code}"
            )
        if not response.ok:
            raise OrthancRequestError(
                f"Orthanc refused {what}: HTTP {response.status_code}", details={"http": response.status_code}
            )
        return response

    def _json(self, path: str, what: str, **params: Any) -> Any:
        return self._request("GET", path, what, params=params or None).json()

    # -- reading ----------------------------------------------------------------------------------------
    def system(self) -> dict[str, Any]:
        """Orthanc's ``/system`` (version, name); checks that it answers and accepts the credentials."""
        return self._json("/system", "reading /system")

    def changes(self, since: int, limit: int = 100) -> tuple[list[Change], int, bool]:
        """One page of the change feed after sequence number ``since``.

        Args:
            since: the last sequence number already read (0 for the start).
            limit: most changes in the page.

        Returns:
            The changes, the sequence number to continue from, and whether the feed is read to its end.
        """
        page = self._json("/changes", "reading the change feed", since=since, limit=limit)
        changes = [
            Change(int(c["Seq"]), str(c["ChangeType"]), str(c["ResourceType"]), str(c["ID"]))
            for c in page.get("Changes", [])
        ]
        last = int(page.get("Last", since))
        return changes, max(last, since), bool(page.get("Done", True))

    def series(self, series_id: str) -> dict[str, Any]:
        """A series' resource (``MainDicomTags``, ``Instances``, ``ParentStudy``, ``IsStable``).

        Args:
            series_id: Orthanc's ID of the series.
        """
        return self._json(f"/series/{series_id}", "reading a series")

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance, as stored.

        Args:
            instance_id: Orthanc's ID of the instance.
        """
        return self._request("GET", f"/instances/{instance_id}/file", "reading an instance").content

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """The resources whose DICOM identifier is ``uid`` (``/tools/lookup``).

        Args:
            uid: a Study, Series or SOP Instance UID (or a patient ID).
        """
        return self._request("POST", "/tools/lookup", "looking up an identifier", data=uid).json()

    def instance_ids(self, sop_instance_uid: str) -> list[str]:
        """Orthanc's IDs of the instances with this SOP Instance UID (none, or one).

        Args:
            sop_instance_uid: the instance's UID.
        """
        return [hit["ID"] for hit in self.lookup(sop_instance_uid) if hit.get("Type") == "Instance"]

    # -- writing ----------------------------------------------------------------------------------------
    def delete_instance(self, instance_id: str) -> None:
        """Delete one instance.

        Args:
            instance_id: Orthanc's ID of the instance.
        """
        self._request("DELETE", f"/instances/{instance_id}", "deleting an instance")

    def stow(self, study_uid: str, files: Sequence[bytes]) -> None:
        """Store DICOM files into a study with one STOW-RS request.

        Args:
            study_uid: the study they belong to.
            files: the encoded DICOM files (Part 10).

        Raises:
            OrthancRequestError: when Orthanc refuses the request or any instance in it.
        """
        boundary = f"braintumor-{secrets.token_hex(12)}"
        body = b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
            for data in files
        )
        body += b"--" + boundary.encode() + b"--\r\n"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        response = self._request(
            "POST",
            f"{self.dicomweb_root}/studies/{study_uid}",
            "storing the result (STOW-RS)",
            data=body,
            headers=headers,
        )
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        failed = (answer.get("00081198") or {}).get("Value") or []
        stored = (answer.get("00081199") or {}).get("Value") or []
        if failed or len(stored) != len(files):
            raise OrthancRequestError(
                f"Orthanc stored {len(stored)} of the {len(files)} result objects (STOW-RS): {len(failed)} refused"
            )
