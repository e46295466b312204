"""``braintumor app``: a small web page for clinicians, calling the Triton server through the SDK.

Upload a JPEG, PNG or DICOM slice; the page shows the predicted class, the probability of each class, the
calibrated tumor probability, the Grad-CAM heatmap over the slice, the model version, and a plain notice
that this is a research and decision-support tool, not a diagnosis. Nothing is stored: the upload lives
in memory for the duration of its request, and only its pixels are sent to the server.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from braintumor.classifier import TumorClassifier
from braintumor.config import DEFAULT_URL, LABELS, MODEL_NAME
from braintumor.errors import BrainTumorError, InvalidImageError, http_status
from braintumor.explain import overlay

#: Largest upload accepted, in bytes.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
#: What each label means, in words for clinicians.
DISPLAY_NAMES = {"glioma": "Glioma", "meningioma": "Meningioma", "notumor": "No tumor", "pituitary": "Pituitary tumor"}
NOTICE = (
    "Research and decision-support tool. This is not a diagnosis and not a medical device: a qualified "
    "reader must review every scan. Results were validated on one public dataset of 2-D slices only."
)


def create_app(url: str = DEFAULT_URL, model_version: str | None = None, timeout: float = 15.0) -> FastAPI:
    """Build the web application.

    Args:
        url: the Triton server's gRPC address.
        model_version: a version to pin, or ``None`` for the latest.
        timeout: deadline of each call to the server, in seconds.
    """
    app = FastAPI(title="braintumor", docs_url=None, redoc_url=None)
    classifier = TumorClassifier(url, MODEL_NAME, model_version, timeout=timeout, check=False)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{NOTICE}}", NOTICE)

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/predict")
    async def predict(file: UploadFile = File(...)) -> JSONResponse:  # noqa: B008 - FastAPI's idiom
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return _error(413, f"the file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        name = file.filename or "upload"
        try:
            prediction = await run_in_threadpool(classifier.predict, data, explain=True)
            preprocessing = classifier.model.preprocessing_of(prediction.model_version)
            picture = await run_in_threadpool(overlay, data, prediction, preprocessing=preprocessing)
        except InvalidImageError as err:
            return _error(422, str(err).replace("<bytes>", name))
        except BrainTumorError as err:
            return _error(http_status(err), f"the model server could not answer: {err}")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        body: dict[str, Any] = {
            "file": name,
            "label": prediction.label,
            "label_name": DISPLAY_NAMES[prediction.label],
            "probabilities": [
                {"label": label, "name": DISPLAY_NAMES[label], "probability": prediction.probabilities[label]}
                for label in LABELS
            ],
            "tumor_probability": prediction.tumor_probability,
            "model_name": prediction.model_name,
            "model_version": prediction.model_version,
            "heatmap_png": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
            "notice": NOTICE,
        }
        return JSONResponse(body)

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


#: The page: one static file, with the notice filled in.
PAGE = (Path(__file__).parent / "static" / "index.html").read_text()
