"""The server a beginner writes: FastAPI + ONNX Runtime, one model run per request, no batching.

It is the baseline of ``benchmarks/serve.py``. Two variants, both straight from the FastAPI and ONNX
Runtime tutorials, so the benchmark can compare against the better of the two:

- ``--style async``: ``async def`` endpoint, ``await file.read()``, ``session.run`` inline (it blocks
  the event loop while the model runs);
- ``--style sync``: plain ``def`` endpoint, which FastAPI runs in its thread pool, so several
  ``session.run`` calls overlap.

It decodes the upload with the same conversion as visionloop (``to_array``) and answers top-1.

    .venv/bin/python benchmarks/naive_server.py --model EXPORT/model.onnx --card EXPORT/model_card.json --port 8091
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from visionloop.data.preprocess import to_array


def build_app(model: str, card_path: str, threads: int, style: str) -> FastAPI:
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    size, channels, classes = card["image_size"], card["channels"], card["classes"]
    app = FastAPI()

    def classify(data: bytes) -> dict:
        pixels = to_array(Image.open(io.BytesIO(data)), size, channels)[None].astype(np.float32) / 255.0
        probs = session.run(["probabilities"], {"input": pixels})[0][0]
        best = int(probs.argmax())
        return {"label": classes[best], "probability": float(probs[best])}

    if style == "async":

        @app.post("/predict")
        async def predict_async(file: UploadFile = File(...)) -> dict:
            return classify(await file.read())
    else:

        @app.post("/predict")
        def predict_sync(file: UploadFile = File(...)) -> dict:
            return classify(file.file.read())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--card", required=True)
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--style", choices=("async", "sync"), default="async")
    args = parser.parse_args()
    app = build_app(args.model, args.card, args.threads, args.style)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
