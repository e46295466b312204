"""The PACS worker against a real Orthanc and the real Triton server.

Synthetic MR series with made-up patient data go to Orthanc by C-STORE, as a scanner would send them;
``braintumor pacs`` classifies them through Triton and writes a Comprehensive SR and a Secondary Capture back.
The results are read back from Orthanc and compared with what the SDK says about the same slices.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")

import highdicom as hd
import pydicom
from orthanc_helpers import OrthancServer, Patient, TcpProxy, c_store, mr_series, orthanc_missing
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from braintumor.classifier import TumorClassifier
from braintumor.explain import overlay
from braintumor.pacs import report
from braintumor.pacs.errors import OrthancUnavailableError, StateMismatchError
from braintumor.pacs.orthanc import OrthancClient, credentials_from_env
from braintumor.pacs.series import fingerprint
from braintumor.pacs.state import StateStore, Status
from braintumor.pacs.worker import PacsWorker, Summary, WorkerConfig

BRAINTUMOR = str(Path(sys.executable).with_name("braintumor"))


@pytest.fixture
def orthanc(tmp_path):
    """A fresh Orthanc for each test (each worker follows the whole change feed of its Orthanc)."""
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


# -- helpers ------------------------------------------------------------------------------------------------
def run_cli(server: OrthancServer, state: Path, triton_url: str, *args: str, timeout: float = 180):
    """``braintumor pacs`` in a process of its own, with Orthanc's credentials in its environment."""
    command = [BRAINTUMOR, "pacs", "--orthanc", server.url, "--url", triton_url, "--state", str(state), *args]
    env = {**os.environ, **server.env()}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def worker(server: OrthancServer, state: StateStore, triton_url: str, **config) -> PacsWorker:
    """The worker in this process (quicker than a process of its own, where the test needs no CLI)."""
    client = OrthancClient(server.url, server.auth)
    return PacsWorker(client, state, WorkerConfig(triton_url=triton_url, poll_interval=0.2, **config))


def run_once(server: OrthancServer, path: Path, triton_url: str, **config) -> Summary:
    """``braintumor pacs --once``, in this process."""
    with StateStore(path, OrthancClient(server.url).address) as state:
        w = worker(server, state, triton_url, **config)
        try:
            return w.run(once=True)
        finally:
            w.close()


def encode(ds: pydicom.Dataset) -> bytes:
    return report.encode(ds)


def results_in_study(server: OrthancServer, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Every SR and Secondary Capture object in a study, by modality (SR, OT)."""
    found: dict[str, list[pydicom.Dataset]] = {"SR": [], "OT": []}
    for series in server.series_of_study(study_uid):
        modality = series["MainDicomTags"].get("Modality")
        if modality in found:
            for instance in series["Instances"]:
                data = server.get(f"/instances/{instance}/file").content
                found[modality].append(pydicom.dcmread(io.BytesIO(data)))
    return found


def result_of(server: OrthancServer, series: list[pydicom.Dataset]) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """The one SR and the one Secondary Capture written for an input series (fails when not exactly one)."""
    slices = {ds.SOPInstanceUID for ds in series}
    found = results_in_study(server, series[0].StudyInstanceUID)
    srs = [
        sr
        for sr in found["SR"]
        if {
            ref.ReferencedSOPInstanceUID
            for item in sr.CurrentRequestedProcedureEvidenceSequence
            for s in item.ReferencedSeriesSequence
            for ref in s.ReferencedSOPSequence
        }
        == slices
    ]
    scs = [sc for sc in found["OT"] if sc.SourceImageSequence[0].ReferencedSOPInstanceUID in slices]
    assert len(srs) == 1, f"{len(srs)} SRs for one series"
    assert len(scs) == 1, f"{len(scs)} Secondary Captures for one series"
    return srs[0], scs[0]


def read_sr(sr: pydicom.Dataset) -> dict:
    """What the SR says, read back with highdicom."""
    document = hd.sr.ComprehensiveSR.from_dataset(sr)
    groups = document.content.get_image_measurement_groups()

    def values(group) -> dict:
        items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group[0].ContentSequence}
        measurements = {m.name.value: float(m.value) for m in group.get_measurements()}
        return {
            "sop": group.source_images[0].referenced_sop_instance_uid,
            "finding": group.finding_type.value,
            "tumor": measurements["TUMOR-P"],
            "classes": {k: v for k, v in measurements.items() if k != "TUMOR-P"},
            "algorithm": (items["111001"].TextValue, items["111003"].TextValue),
        }

    texts = [i.TextValue for i in document.ContentSequence if i.ValueType == "TEXT"]
    return {"series": values(groups[0]), "slices": [values(g) for g in groups[1:]], "texts": texts}


def dciodvfy_errors(ds: pydicom.Dataset, folder: Path) -> list[str]:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(encode(ds))
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def check_result(server: OrthancServer, series: list[pydicom.Dataset], classifier: TumorClassifier, tmp: Path):
    """The SR and the Secondary Capture of ``series`` hold exactly what the SDK says about its slices."""
    sr, sc = result_of(server, series)
    expected = [classifier.predict(encode(ds), explain=True) for ds in series]
    got = read_sr(sr)
    assert len(got["slices"]) == len(series)
    for ds, prediction, row in zip(series, expected, got["slices"], strict=True):
        assert row["sop"] == ds.SOPInstanceUID
        assert row["tumor"] == pytest.approx(prediction.tumor_probability, abs=1e-4)
        assert row["finding"] == report.CLASS_CODES[prediction.label].value
        for label, p in prediction.probabilities.items():
            assert row["classes"][f"{report.CLASS_CODES[label].value}-P"] == pytest.approx(p, abs=1e-4)
        assert row["algorithm"] == (prediction.model_name, prediction.model_version)
    best = max(p.tumor_probability for p in expected)
    top = next(i for i, ds in enumerate(series) if ds.SOPInstanceUID == got["series"]["sop"])
    assert expected[top].tumor_probability == pytest.approx(best, abs=1e-4)
    assert got["series"]["tumor"] == pytest.approx(best, abs=1e-4)
    assert got["series"]["finding"] == report.CLASS_CODES[expected[top].label].value
    assert report.NOTICE in got["texts"]
    # The Secondary Capture: the top slice's overlay as the SDK draws it, above the notice band.
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == series[top].SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.ImageComments == report.NOTICE
    picture = overlay(encode(series[top]), expected[top], preprocessing=classifier.model.preprocessing)
    factor = max(1, -(-report.MIN_OVERLAY_WIDTH // picture.width))
    picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    pixels = sc.pixel_array
    assert pixels.shape[1] == picture.width and pixels.shape[0] > picture.height
    difference = np.abs(pixels[: picture.height].astype(int) - np.asarray(picture, dtype=int))
    assert difference.max() <= 2 and difference.mean() < 0.05
    # Same patient and study; valid DICOM.
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == series[0].StudyInstanceUID and ds.PatientID == series[0].PatientID
        assert dciodvfy_errors(ds, tmp) == [], ds.SOPClassUID.name
    return sr, sc


def states(path: Path, server: OrthancServer) -> dict[str, tuple[Status, str | None]]:
    """Status and reason of every series in a state file, by Orthanc series ID."""
    with StateStore(path, OrthancClient(server.url).address) as state:
        return {row.series_id: (row.status, row.reason) for row in state.all()}


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # a real Orthanc (and Triton)
def test_pacs_once_writes_sr_and_overlay_equal_to_the_sdk(orthanc, triton, tmp_path):
    """C-STORE two MR series and a CT series; ``braintumor pacs --once``; read the SR and the overlay back."""
    rng = np.random.default_rng(7)
    patient = Patient()
    tumour = mr_series(rng, patient, n=6, series_number=3)
    plain = mr_series(rng, patient, n=4, labels=[2, 2, 0, 2], size=96, series_number=5)
    ct = mr_series(rng, patient, n=2, modality="CT", series_number=7)
    c_store(tumour + plain + ct, orthanc)
    orthanc.wait_stable([s[0].SeriesInstanceUID for s in (tumour, plain, ct)])
    state = tmp_path / "state.sqlite"

    run = run_cli(orthanc, state, triton.config.grpc_url, "--once", "--log-level", "DEBUG")
    assert run.returncode == 0, run.stderr
    with TumorClassifier(triton.config.grpc_url) as classifier:
        for series in (tumour, plain):
            check_result(orthanc, series, classifier, tmp_path)
    by_status = {}
    for status, reason in states(state, orthanc).values():
        by_status.setdefault(status, []).append(reason)
    assert sorted(by_status) == [Status.DONE, Status.SKIPPED]
    assert len(by_status[Status.DONE]) == 2 and by_status[Status.SKIPPED] == ["modality CT, not MR"]
    assert "modality CT, not MR" in run.stderr
    # Privacy: no name, ID, date, UID or password in the worker's log.
    uids = {ds.SOPInstanceUID for s in (tumour, plain, ct) for ds in s} | {
        s[0].SeriesInstanceUID for s in (tumour, plain)
    }
    for secret in [*patient.secrets(), *uids, orthanc.password]:
        assert secret not in run.stderr + run.stdout, "identifying data in the log"

    # Run again once the results are stable too: nothing new is written, the worker's own results are skipped.
    written = results_in_study(orthanc, patient.study_uid)
    orthanc.wait_stable([ds.SeriesInstanceUID for objects in written.values() for ds in objects])
    again = run_cli(orthanc, state, triton.config.grpc_url, "--once")
    assert again.returncode == 0, again.stderr
    found = results_in_study(orthanc, patient.study_uid)
    assert len(found["SR"]) == 2 and len(found["OT"]) == 2
    assert "a braintumor result" in again.stderr
    status = run_cli(orthanc, state, triton.config.grpc_url, "--status")
    assert status.stdout.startswith("2 done, 5 skipped, 0 failed"), status.stdout  # CT, 2 SR, 2 overlays


@pytest.mark.slow  # a real Orthanc (and Triton)
def test_credentials_come_from_the_environment(orthanc, tmp_path):
    wrong = {**os.environ, "ORTHANC_USERNAME": orthanc.username, "ORTHANC_PASSWORD": "not-the-password"}
    command = [BRAINTUMOR, "pacs", "--orthanc", orthanc.url, "--state", str(tmp_path / "s.sqlite"), "--once"]
    run = subprocess.run(command, env=wrong, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "refused the credentials" in run.stderr
    assert "not-the-password" not in run.stderr
    assert credentials_from_env({}) is None
    with pytest.raises(OrthancUnavailableError, match="both"):
        credentials_from_env({"ORTHANC_USERNAME": "u"})
    with pytest.raises(OrthancUnavailableError, match="no credentials in the Orthanc URL"):
        OrthancClient(f"http://u:p@127.0.0.1:{orthanc.http_port}")


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # a real Orthanc (and Triton)
def test_bad_input_is_processed_skipped_or_failed_with_one_reason(orthanc, triton, tmp_path):
    rng = np.random.default_rng(11)
    patient = Patient()
    # Processed correctly: RLE-compressed pixel data (pydicom decodes it), slices of another size and depth.
    rle = mr_series(rng, patient, n=3, size=96, series_number=1)
    for ds in rle:
        ds.compress(RLELossless)
    mixed = mr_series(rng, patient, n=3, size=96, series_number=2)
    odd = mr_series(rng, patient, n=1, size=144, bits=8, series_number=2)[0]
    odd.SeriesInstanceUID, odd.FrameOfReferenceUID, odd.InstanceNumber = (
        mixed[0].SeriesInstanceUID,
        mixed[0].FrameOfReferenceUID,
        4,
    )
    mixed.append(odd)
    # Failed: compressed pixel data no installed decoder reads; a truncated slice.
    undecodable = mr_series(rng, patient, n=2, size=96, series_number=3)
    for ds in undecodable:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
        ds["PixelData"].VR = "OB"
    truncated = mr_series(rng, patient, n=3, size=96, series_number=4)
    truncated[1].PixelData = truncated[1].PixelData[: len(truncated[1].PixelData) // 2]
    # Skipped: a multi-frame object, a CT series.
    multiframe = mr_series(rng, patient, n=1, size=96, series_number=5)
    frames = mr_series(rng, patient, n=3, size=96, series_number=5)
    multiframe[0].NumberOfFrames = 3
    multiframe[0].PixelData = b"".join(ds.PixelData for ds in frames)
    ct = mr_series(rng, patient, n=2, size=96, modality="CT", series_number=6)

    c_store(rle + mixed + ct, orthanc)
    for ds in undecodable + truncated + multiframe:
        orthanc.upload(encode(ds))
    groups = {"rle": rle, "mixed": mixed, "undecodable": undecodable, "truncated": truncated}
    groups |= {"multiframe": multiframe, "ct": ct}
    orthanc.wait_stable([s[0].SeriesInstanceUID for s in groups.values()])
    state = tmp_path / "state.sqlite"

    run = run_cli(orthanc, state, triton.config.grpc_url, "--once", "--triton-attempts", "1")
    assert run.returncode == 1, run.stderr  # some series failed; the worker went through all of them
    ended = states(state, orthanc)
    got = {name: ended[orthanc.series_id(series[0].SeriesInstanceUID)] for name, series in groups.items()}
    assert got["rle"] == (Status.DONE, None) and got["mixed"] == (Status.DONE, None)
    assert got["undecodable"][0] == Status.FAILED
    assert re.fullmatch(
        r"slice 1 of 2: its pixel data \(JPEG 2000.*\) cannot be decoded \(\w+\)", got["undecodable"][1]
    )
    assert got["truncated"] == (
        Status.FAILED,
        "slice 2 of 3: its pixel data is truncated (9216 bytes where 96×96 pixels of 16 bits need 18432)",
    )
    assert got["multiframe"][0] == Status.SKIPPED and "multi-frame" in got["multiframe"][1]
    assert got["ct"] == (Status.SKIPPED, "modality CT, not MR")
    with TumorClassifier(triton.config.grpc_url) as classifier:
        check_result(orthanc, rle, classifier, tmp_path)
        check_result(orthanc, mixed, classifier, tmp_path)
    found = results_in_study(orthanc, patient.study_uid)
    assert len(found["SR"]) == 2 and len(found["OT"]) == 2  # nothing for what failed or was skipped


# -- interruptions --------------------------------------------------------------------------------------------
class Worker:
    """``braintumor pacs`` following Orthanc in the background, its log read line by line."""

    def __init__(self, server: OrthancServer, state: Path, triton_url: str) -> None:
        command = [BRAINTUMOR, "pacs", "--orthanc", server.url, "--url", triton_url, "--state", str(state)]
        self.process = subprocess.Popen(
            [*command, "--poll", "0.2"], env={**os.environ, **server.env()}, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def wait(self, timeout: float = 120) -> int:
        """Wait for the worker to exit and for its whole log to be read; its exit status."""
        code = self.process.wait(timeout)
        self._reader.join(10)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return code

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, "the worker exited:\n" + "".join(self.log)
                continue
            self.log.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no {pattern!r} in the worker's log:\n" + "".join(self.log))


@pytest.mark.slow  # a real Orthanc (and Triton)
def test_stopped_or_killed_mid_series_every_series_ends_with_one_result(orthanc, triton, tmp_path, caplog):
    rng = np.random.default_rng(3)
    patient = Patient()
    all_series = [mr_series(rng, patient, n=5, size=96, series_number=k) for k in range(1, 5)]
    c_store([ds for s in all_series for ds in s], orthanc)
    orthanc.wait_stable([s[0].SeriesInstanceUID for s in all_series])
    state = tmp_path / "state.sqlite"

    # SIGTERM while a series is in hand: that series is finished, then the worker exits cleanly.
    first = Worker(orthanc, state, triton.config.grpc_url)
    tag = first.wait_for(r"series (\w+): 5 instances, processing").split("series ")[1].split(":")[0]
    first.process.send_signal(signal.SIGTERM)
    assert first.wait(120) == 0
    assert (Status.DONE, None) in states(state, orthanc).values()
    assert any(f"series {tag}: done" in line for line in first.log)

    # SIGKILL in the middle of the next series: nothing to finish it.
    second = Worker(orthanc, state, triton.config.grpc_url)
    second.wait_for(r"series \w+: 5 instances, processing")
    second.process.kill()
    second.wait(30)
    assert Status.IN_PROGRESS in {status for status, _ in states(state, orthanc).values()}

    # Restart (in this process, to save a start-up): every series ends done, with one SR and one overlay.
    assert run_once(orthanc, state, triton.config.grpc_url).counts["done"] == 3
    series_states = states(state, orthanc)
    for series in all_series:
        assert series_states[orthanc.series_id(series[0].SeriesInstanceUID)] == (Status.DONE, None)
        result_of(orthanc, series)

    # A worker stopped between storing and recording (simulated: one object of a result gone, the series
    # back in progress): the restart replaces the partial result; still exactly one of each, same UIDs.
    first_series = all_series[0]
    sr, sc = result_of(orthanc, first_series)
    orthanc_id = orthanc.series_id(first_series[0].SeriesInstanceUID)
    for hit in orthanc.json_post("/tools/lookup", sc.SOPInstanceUID):
        orthanc.delete(f"/instances/{hit['ID']}")
    with sqlite3.connect(state) as db:
        db.execute(
            "UPDATE series SET status = 'in_progress', planned = ? WHERE id = ?",
            (f'["{sr.SOPInstanceUID}", "{sc.SOPInstanceUID}"]', orthanc_id),
        )
    with caplog.at_level(logging.INFO, logger="braintumor.pacs"):
        assert run_once(orthanc, state, triton.config.grpc_url).counts["done"] == 1
    assert "removed a partial result" in caplog.text
    sr2, sc2 = result_of(orthanc, first_series)
    assert (sr2.SOPInstanceUID, sc2.SOPInstanceUID) == (sr.SOPInstanceUID, sc.SOPInstanceUID)
    found = results_in_study(orthanc, patient.study_uid)
    assert len(found["SR"]) == 4 and len(found["OT"]) == 4


@pytest.mark.slow  # a real Orthanc (and Triton)
def test_triton_unavailable_fails_with_reason_then_processed_on_retry(orthanc, triton, tmp_path):
    """Triton behind a proxy: stop the proxy and Triton is gone, start it and Triton is back, same address."""
    rng = np.random.default_rng(5)
    patient = Patient()
    all_series = [mr_series(rng, patient, n=3, size=96, series_number=k) for k in (1, 2)]
    c_store([ds for s in all_series for ds in s], orthanc)
    orthanc.wait_stable([s[0].SeriesInstanceUID for s in all_series])
    proxy = TcpProxy(triton.config.grpc_port)  # not started: nothing listens there
    state_path = tmp_path / "state.sqlite"

    with StateStore(state_path, OrthancClient(orthanc.url).address) as state:
        w = worker(orthanc, state, proxy.url, attempts=2, backoff=0.05, timeout=5)
        started = time.perf_counter()
        summary = w.run(once=True)
        w.close()
        assert summary.counts == {"failed": 2}
        assert time.perf_counter() - started < 60
        for row in state.all():
            assert row.status == Status.FAILED
            assert row.reason.startswith(f"Triton at {proxy.url} unavailable after 2 attempts: ")
    assert results_in_study(orthanc, patient.study_uid) == {"SR": [], "OT": []}

    proxy.start()
    try:
        # Without --retry-failed, failed series stay failed; with it, they are processed.
        idle = run_cli(orthanc, state_path, proxy.url, "--once")
        assert idle.returncode == 0 and "nothing to do" in idle.stderr
        run = run_cli(orthanc, state_path, proxy.url, "--once", "--retry-failed")
        assert run.returncode == 0, run.stderr
        assert "2 failed series queued again" in run.stderr
    finally:
        proxy.stop()
    assert {s for s, _ in states(state_path, orthanc).values()} == {Status.DONE}
    with TumorClassifier(triton.config.grpc_url) as classifier:
        for series in all_series:
            check_result(orthanc, series, classifier, tmp_path)


@pytest.mark.slow  # a real Orthanc (and Triton)
def test_a_series_that_grows_gets_a_new_result_in_place_of_the_old(orthanc, triton, tmp_path, caplog):
    rng = np.random.default_rng(9)
    patient = Patient()
    series = mr_series(rng, patient, n=4, size=96)
    c_store(series[:3], orthanc)
    orthanc.wait_stable([series[0].SeriesInstanceUID])
    state = tmp_path / "state.sqlite"
    assert run_once(orthanc, state, triton.config.grpc_url).counts == {"done": 1}
    old_sr, _ = result_of(orthanc, series[:3])

    c_store(series[3:], orthanc)  # a late slice: Orthanc calls the series stable again
    time.sleep(0.3)
    orthanc.wait_stable([series[0].SeriesInstanceUID])
    assert run_once(orthanc, state, triton.config.grpc_url).counts["done"] == 1
    sr, _ = result_of(orthanc, series)  # exactly one result, about all four slices
    assert sr.SOPInstanceUID != old_sr.SOPInstanceUID
    found = results_in_study(orthanc, patient.study_uid)
    assert len(found["SR"]) == 1 and len(found["OT"]) == 1  # the old result is gone

    # Called stable again with the same instances: nothing is redone.
    with StateStore(state, OrthancClient(orthanc.url).address) as store:
        store.enqueue([(orthanc.series_id(series[0].SeriesInstanceUID), "tag")], store.cursor)
    with caplog.at_level(logging.INFO, logger="braintumor.pacs"):
        assert run_once(orthanc, state, triton.config.grpc_url).counts["done"] == 1
    assert "stable again with the same 4 instances; stays done" in caplog.text
    assert result_of(orthanc, series)[0].SOPInstanceUID == sr.SOPInstanceUID


# -- the state file and the result UIDs, without servers --------------------------------------------------
def test_state_file_resumes_requeues_and_refuses_a_second_worker(tmp_path):
    path = tmp_path / "state.sqlite"
    with StateStore(path, "http://127.0.0.1:1") as state:
        assert state.enqueue([("a", "ta"), ("b", "tb")], cursor=5) == 2
        assert state.cursor == 5
        with pytest.raises(StateMismatchError, match="another braintumor pacs worker"):
            StateStore(path, "http://127.0.0.1:1")
        state.start("a", "fp-a")
        state.finish("b", Status.SKIPPED, "modality CT, not MR")
        assert state.enqueue([("a", "ta")], cursor=3) == 0  # in progress: not queued twice; cursor never goes back
        assert state.cursor == 5
    with StateStore(path, "http://127.0.0.1:1") as state:  # a restart: the interrupted series comes first
        assert state.next_series().series_id == "a"
        state.finish("a", Status.DONE, None, "fp-a", ["1.2.3", "1.2.4"])
        assert state.next_series() is None
        assert state.enqueue([("a", "ta")], cursor=9) == 1  # stable again: queued, its last status kept aside
        row = state.next_series()
        assert (row.status, row.previous, row.fingerprint, row.results) == (
            Status.PENDING,
            Status.DONE,
            "fp-a",
            ("1.2.3", "1.2.4"),
        )
    with pytest.raises(StateMismatchError, match="follows another Orthanc"):
        StateStore(path, "http://127.0.0.1:2")


def test_result_uids_are_deterministic_and_change_with_the_input_or_model():
    base = report.result_uids("1.2.3", fingerprint(["x", "y"]), "braintumor", "2")
    assert base == report.result_uids("1.2.3", fingerprint(["y", "x"]), "braintumor", "2")
    assert base != report.result_uids("1.2.3", fingerprint(["x"]), "braintumor", "2")
    assert base != report.result_uids("1.2.3", fingerprint(["x", "y"]), "braintumor", "3")
    uids = [base.sr_series, base.sr_instance, base.sc_series, base.sc_instance]
    assert len(set(uids)) == 4
    assert all(re.fullmatch(r"2\.25\.[1-9]\d*", u) and len(u) <= 64 for u in uids)


@pytest.mark.parametrize(
    ("cosines", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),  # axial
        ([0, 1, 0, 0, 0, -1], ("P", "F")),  # sagittal
        ([-1, 0, 0, 0, 0, -1], ("R", "F")),  # coronal
        (None, ("L", "P")),
    ],
)
def test_patient_orientation_from_image_orientation(cosines, expected):
    ds = pydicom.Dataset()
    if cosines is not None:
        ds.ImageOrientationPatient = cosines
    assert report.patient_orientation(ds) == expected
