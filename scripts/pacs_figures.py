"""The README's pictures of the PACS worker: its SR and its overlay as a viewer shows them.

Makes a made-up MR series of Testing slices from the shared dataset (one per class, then more no-tumour
slices) with made-up patient data, sends it to a temporary Orthanc by C-STORE, runs ``braintumor pacs --once``,
reads the SR and the Secondary Capture back from Orthanc, and writes into ``docs/pacs/``:

- ``overlay.png``: the Secondary Capture's pixels, as any viewer shows them;
- ``sr.txt``: the SR as DCMTK's ``dsrdump`` renders it (DCMTK comes with Debian's orthanc package);
- ``orthanc.png``: the study in Orthanc Explorer, the MR series beside its SR and overlay (headless Chromium).

    .venv/bin/python scripts/pacs_figures.py [--url 127.0.0.1:8001]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_pacs import triton  # noqa: E402
from orthanc_helpers import OrthancServer, Patient, c_store, mr_series, orthanc_missing  # noqa: E402

from braintumor.config import DEFAULT_DATA_DIR  # noqa: E402


def dataset_slices(size: int = 256) -> list[np.ndarray]:
    """Eight Testing slices: glioma, meningioma, pituitary, then no-tumour ones, resized to ``size``."""
    testing = DEFAULT_DATA_DIR / "Testing"
    names = [("notumor", 0), ("notumor", 1), ("glioma", 3), ("notumor", 2)]
    names += [("meningioma", 5), ("notumor", 3), ("pituitary", 7), ("notumor", 4)]
    out = []
    for label, k in names:
        path = sorted((testing / label).glob("*.jpg"))[k]
        out.append(np.asarray(Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)))
    return out


def explorer(server: OrthancServer, study: str, png: Path) -> None:
    """Screenshot of the study in Orthanc Explorer (Orthanc's own web viewer), by headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("pacs_figures: no chromium, no screenshot of Orthanc Explorer", file=sys.stderr)
        return
    url = (
        f"http://{server.username}:{server.password}@127.0.0.1:{server.http_port}/app/explorer.html#study?uuid={study}"
    )
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
         f"--screenshot={png}", "--window-size=1000,600", url],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running Triton's gRPC address (default: start one)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "pacs"))
    args = parser.parse_args()
    missing = orthanc_missing() or (None if DEFAULT_DATA_DIR.is_dir() else f"no dataset at {DEFAULT_DATA_DIR}")
    if missing:
        print(f"pacs_figures: {missing}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = dataset_slices()
    patient = Patient(name="Synthetic^Demo", patient_id="DEMO-0001")
    series = mr_series(np.random.default_rng(0), patient, n=len(images), size=256, images=images)
    with (
        tempfile.TemporaryDirectory() as folder,
        triton(args.url) as grpc_url,
        OrthancServer(Path(folder) / "orthanc") as server,
    ):
        c_store(series, server)
        server.wait_stable([series[0].SeriesInstanceUID])
        command = [str(Path(sys.executable).with_name("braintumor")), "pacs", "--orthanc", server.url]
        command += ["--url", grpc_url, "--state", str(Path(folder) / "state.sqlite"), "--once"]
        run = subprocess.run(command, env={**os.environ, **server.env()}, capture_output=True, text=True)
        print(run.stderr, end="")
        if run.returncode:
            return run.returncode
        study = server.json_post("/tools/lookup", patient.study_uid)[0]["ID"]
        explorer(server, study, out / "orthanc.png")
        files = {}
        for found in server.series_of_study(patient.study_uid):
            modality = found["MainDicomTags"].get("Modality")
            if modality in ("SR", "OT"):
                files[modality] = server.get(f"/instances/{found['Instances'][0]}/file").content
    Image.fromarray(pydicom.dcmread(io.BytesIO(files["OT"])).pixel_array).save(out / "overlay.png")
    with tempfile.TemporaryDirectory() as folder:
        sr = Path(folder) / "sr.dcm"
        sr.write_bytes(files["SR"])
        text = subprocess.run(["dsrdump", str(sr)], capture_output=True, text=True, check=True).stdout
        (out / "sr.txt").write_text(text)
    print(f"Wrote {out}/overlay.png, sr.txt and orthanc.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
