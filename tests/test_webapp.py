"""The clinicians' web page, end to end: real Triton, the app as a process, a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import free_ports

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from braintumor.classifier import TumorClassifier
from braintumor.webapp import DISPLAY_NAMES

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def app_url(triton):
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "braintumor.cli", "app", "--url", triton.config.grpc_url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "healthz", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the web app did not start: " + (proc.stderr.read() if proc.stderr else ""))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        yield browser
        browser.close()


def test_uploading_a_real_mri_shows_label_probabilities_heatmap_and_notice(
    app_url, browser, triton, shared_data, tmp_path
):
    image = shared_data / "Testing" / "meningioma" / "Te-me_0010.jpg"
    with TumorClassifier(triton.config.grpc_url) as classifier:
        expected = classifier.predict(image)
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    page.goto(app_url)
    notice = page.inner_text("#notice")
    assert "not a diagnosis" in notice and "decision-support" in notice
    page.set_input_files("#file", str(image))
    page.click("#analyse")
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    assert page.inner_text("#label") == DISPLAY_NAMES[expected.label]
    assert page.inner_text("#tumor") == f"{100 * expected.tumor_probability:.1f} %"
    assert page.inner_text("#version") == expected.model_version
    assert page.locator("#probabilities tr").count() == 4
    assert page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth") >= 200
    assert page.is_hidden("#error")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 20_000


def test_a_corrupt_upload_shows_a_readable_error(app_url, browser, tmp_path):
    corrupt = tmp_path / "scan.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)
    page = browser.new_page()
    page.goto(app_url)
    page.set_input_files("#file", str(corrupt))
    page.click("#analyse")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    message = page.inner_text("#error")
    assert "Could not analyse this file" in message and "scan.jpg" in message
    assert page.is_hidden("#result")


def test_a_dicom_upload_is_classified(app_url, browser, tmp_path):
    from pydicom import examples

    path = tmp_path / "slice.dcm"
    examples.mr.save_as(path, enforce_file_format=True)
    page = browser.new_page()
    page.goto(app_url)
    page.set_input_files("#file", str(path))
    page.click("#analyse")
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    assert page.inner_text("#label") in DISPLAY_NAMES.values()
    assert page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth") > 0
