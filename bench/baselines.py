"""The servers ml-api is measured against, each run under the same Gunicorn settings.

- `article_app`: the service most tutorials build: FastAPI, pydantic body and
  response models, sklearn `predict` and `predict_proba` in a `def` route.
- `noop_app`: FastAPI with the same body and response models, no model.
- `bare_app`: an ASGI callable that parses the JSON body and returns fixed bytes.

The model comes from BENCH_BUNDLE (a bundle directory made by training).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class IrisFeatures(BaseModel):
    sepal_length: float
    sepal_width: float
    petal_length: float
    petal_width: float


class PredictionOut(BaseModel):
    predicted_class: int
    predicted_class_name: str
    confidence: float
    probabilities: dict[str, float]
    model_version: str


CLASSES = ["setosa", "versicolor", "virginica"]
CONSTANT = PredictionOut(
    predicted_class=0,
    predicted_class_name="setosa",
    confidence=1.0,
    probabilities={"setosa": 1.0, "versicolor": 0.0, "virginica": 0.0},
    model_version="1.0.0",
)


def _article() -> FastAPI:
    import joblib
    import numpy as np

    model: Any = joblib.load(Path(os.environ["BENCH_BUNDLE"]) / "model.joblib")
    app = FastAPI()

    @app.post("/predict", response_model=PredictionOut)
    def predict(features: IrisFeatures) -> PredictionOut:
        x = np.array(
            [
                [
                    features.sepal_length,
                    features.sepal_width,
                    features.petal_length,
                    features.petal_width,
                ]
            ]
        )
        predicted = int(model.predict(x)[0])
        probabilities = model.predict_proba(x)[0]
        return PredictionOut(
            predicted_class=predicted,
            predicted_class_name=CLASSES[predicted],
            confidence=float(probabilities.max()),
            probabilities=dict(zip(CLASSES, map(float, probabilities), strict=True)),
            model_version="1.0.0",
        )

    return app


def _noop() -> FastAPI:
    app = FastAPI()

    @app.post("/predict", response_model=PredictionOut)
    async def predict(features: IrisFeatures) -> PredictionOut:
        return CONSTANT

    return app


_FIXED = CONSTANT.model_dump_json().encode()


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    json.loads(body)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_FIXED)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _FIXED})


def __getattr__(name: str) -> Any:
    # Built on first access, in the worker: importing one baseline must not
    # load the model for another.
    if name == "article_app":
        return _article()
    if name == "noop_app":
        return _noop()
    raise AttributeError(name)
