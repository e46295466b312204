"""A real Orthanc for the PACS tests and benchmark: start it, send it synthetic MR series by C-STORE.

Orthanc is Debian's ``orthanc`` package with its ``orthanc-dicomweb`` plugin (``scripts/setup.sh``). Each
:class:`OrthancServer` listens on free loopback ports, keeps its storage in a temporary folder, and asks for
a user name and password made up for it; nothing is left behind when it stops.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from helpers import free_ports
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from synthetic import random_slice

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

__all__ = [
    "OrthancServer",
    "Patient",
    "TcpProxy",
    "c_store",
    "mr_series",
    "orthanc_missing",
]


def orthanc_missing() -> str | None:
    """Why the PACS tests cannot run here, or ``None`` when Orthanc and its DICOMweb plugin are installed."""
    if not Path(ORTHANC).exists():
        return "Debian's orthanc package is not installed (scripts/setup.sh installs it)"
    if not DICOMWEB_PLUGIN.exists():
        return "Debian's orthanc-dicomweb package is not installed (scripts/setup.sh installs it)"
    return None


@dataclass
class OrthancServer:
    """One Orthanc process on free loopback ports with a temporary storage folder and its own credentials.

    Args:
        folder: where its configuration, storage and log go.
        stable_age: seconds without a new instance after which a series is stable.
    """

    folder: Path
    stable_age: int = 1
    username: str = "braintumor-test"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    aet: str = "ORTHANC"
    http_port: int = 0
    dicom_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def env(self) -> dict[str, str]:
        """The environment variables that give ``braintumor pacs`` these credentials."""
        return {"ORTHANC_USERNAME": self.username, "ORTHANC_PASSWORD": self.password}

    def start(self, timeout: float = 30.0) -> OrthancServer:
        self.http_port, self.dicom_port = free_ports(2)
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "braintumor-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "StableAge": self.stable_age,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StorageCompression": False,
            "DicomScpTimeout": 10,
        }
        config_file = self.folder / "orthanc.json"
        config_file.write_text(json.dumps(config, indent=1))
        config_file.chmod(0o600)
        self._log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [ORTHANC, str(config_file)], stdout=self._log, stderr=subprocess.STDOUT, cwd=self.folder
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "orthanc.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(0.5)  # a temporary Orthanc: its slow clean shutdown saves nothing
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST shortcuts for the tests ------------------------------------------------------------------
    def get(self, path: str) -> requests.Response:
        response = requests.get(f"{self.url}{path}", auth=self.auth, timeout=10)
        response.raise_for_status()
        return response

    def json(self, path: str):
        return self.get(path).json()

    def delete(self, path: str) -> None:
        requests.delete(f"{self.url}{path}", auth=self.auth, timeout=10).raise_for_status()

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file through the REST API (for files C-STORE cannot carry)."""
        response = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def series_of_study(self, study_uid: str) -> list[dict]:
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            auth=self.auth,
            timeout=10,
        )
        found.raise_for_status()
        return found.json()

    def series_id(self, series_uid: str) -> str:
        hits = [h for h in self.json_post("/tools/lookup", series_uid) if h["Type"] == "Series"]
        assert len(hits) == 1, hits
        return hits[0]["ID"]

    def json_post(self, path: str, body: str | bytes):
        response = requests.post(f"{self.url}{path}", data=body, auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_stable(self, series_uids: Sequence[str], timeout: float = 30.0) -> None:
        """Wait until Orthanc calls every one of these series stable (so ``--once`` sees them)."""
        deadline = time.monotonic() + timeout
        pending = set(series_uids)
        while pending and time.monotonic() < deadline:
            for uid in list(pending):
                if self.json(f"/series/{self.series_id(uid)}").get("IsStable"):
                    pending.discard(uid)
            if pending:
                time.sleep(0.2)
        assert not pending, f"{len(pending)} series never became stable"


@dataclass(frozen=True)
class Patient:
    """Made-up patient and study data (the privacy tests look for each value in the worker's logs)."""

    name: str = "Doe^Jane^Synthetic"
    patient_id: str = "SYN-4711-PID"
    birth_date: str = "19610203"
    study_date: str = "20240517"
    accession: str = "ACC-99881"
    study_uid: str = field(default_factory=generate_uid)

    def secrets(self) -> list[str]:
        """Every identifying value, as it could appear in a log."""
        return [self.name, self.name.replace("^", " "), self.patient_id, self.birth_date, self.study_date,
                self.accession, self.study_uid]  # fmt: skip


def _pixels(rng: np.random.Generator, size: int, label: int, bits: int) -> np.ndarray:
    grey = np.asarray(random_slice(rng, size, label), dtype=np.uint16)
    return (grey * 16 + rng.integers(0, 16, grey.shape)).astype(np.uint16) if bits == 12 else grey.astype(np.uint8)


def mr_series(
    rng: np.random.Generator,
    patient: Patient,
    n: int = 6,
    *,
    labels: Sequence[int] | None = None,
    size: int = 128,
    bits: int = 12,
    modality: str = "MR",
    series_number: int = 3,
    images: Sequence[np.ndarray] | None = None,
) -> list[Dataset]:
    """A synthetic axial MR series of ``n`` slices (MR Image Storage, explicit VR little endian).

    Args:
        rng: the random generator the slices come from.
        patient: the made-up patient and study it belongs to.
        n: slices.
        labels: the class drawn on each slice (default: no tumour, then one pituitary-like blob mid-series).
        size: rows and columns.
        bits: bits stored: 12 (in 16 allocated, as MR requires), or 8 in 8 allocated (another bit depth).
        modality: ``MR``, or ``CT`` for a CT Image Storage series.
        series_number: its series number.
        images: 8-bit grey pixels to use instead of synthetic slices (``n`` of them, ``size`` square), e.g.
            the dataset's slices, for pictures.
    """
    labels = list(labels) if labels is not None else [2] * n
    if labels == [2] * n and n > 2:
        labels[n // 2] = 3
    series_uid, frame_uid = generate_uid(), generate_uid()
    sop_class = MRImageStorage if modality == "MR" else CT_IMAGE_STORAGE
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER" if modality == "MR" else "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = patient.accession
        ds.Modality = modality
        ds.Manufacturer = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MR BRAIN (synthetic)"
        ds.SeriesDescription = "AX T1 (synthetic)"
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.birth_date
        ds.PatientSex = "F"
        ds.StudyInstanceUID = patient.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "BRAIN" if modality == "MR" else "HEAD"
        ds.InstanceNumber = i + 1
        ds.PatientOrientation = ""
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-115.0, -115.0, -40.0 + 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [230.0 / size, 230.0 / size]
        ds.SliceThickness = 5.0
        ds.SliceLocation = -40.0 + 5.0 * i
        if modality == "MR":
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = 500.0
            ds.EchoTime = 15.0
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
        else:
            ds.KVP = 120.0
            ds.RescaleIntercept = -1024.0
            ds.RescaleSlope = 1.0
            ds.RescaleType = "HU"
            ds.AcquisitionNumber = 1
        if images is None:
            pixels = _pixels(rng, size, labels[i], bits)
        else:
            grey = np.asarray(images[i], dtype=np.uint16)
            pixels = (grey * 16).astype(np.uint16) if bits == 12 else grey.astype(np.uint8)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 8 if bits == 8 else 16
        ds.BitsStored = bits
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def c_store(datasets: Sequence[Dataset], server: OrthancServer, calling_aet: str = "SCANNER") -> None:
    """Send ``datasets`` to Orthanc by C-STORE, as a scanner would; every store must succeed."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    contexts = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    assert assoc.is_established, "Orthanc refused the association"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, f"C-STORE failed: {status}"
    finally:
        assoc.release()


class TcpProxy:
    """A loopback TCP forwarder in front of a server: stop it and the server looks down, start it again and
    the server is back, at the same address.

    Args:
        target_port: the port it forwards to on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        (self.port,) = free_ports(1)
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def running_orthanc(folder: Path, stable_age: int = 1) -> Iterator[OrthancServer]:
    """Start an :class:`OrthancServer` in ``folder`` and stop it afterwards."""
    with OrthancServer(folder, stable_age=stable_age) as server:
        yield server
