"""Serve a visionloop ONNX export with KServe's own Python model server, V2 (Open Inference) protocol.

This is the comparison point for the serving benchmark: the same ONNX model behind ``kserve.ModelServer``
(FastAPI + uvicorn), answering ``POST /v2/models/{name}/infer`` with one ``UINT8`` input named ``input`` of
shape [N, C, H, W] (raw pixels). The pixels are divided by 255 to float32 and run through onnxruntime on the
CPU; the response has ``probabilities`` (FP32, [N, K]) and ``embedding`` (FP32, [N, D]). Binary-data
(``binary_data=True``) and JSON requests/outputs are both handled by KServe's own codec.

kserve pulls in its own dependency set (FastAPI, grpcio, pandas, kubernetes client, ...), so it lives in a
separate virtualenv, not in the project's::

    python3.11 -m venv /work/kserve-venv
    /work/kserve-venv/bin/pip install kserve onnxruntime==1.32.0 numpy
    /work/kserve-venv/bin/python benchmarks/kserve_server.py --model EXPORT/model.onnx \\
        --card EXPORT/model_card.json --port 8090 [--threads N] [--name visionloop-classifier]

Server settings: one process (uvicorn ``workers=1``), gRPC off (KServe would bind it on [::]:8081). By default the
per-request log lines are off (KServe's latency line, its two ``kserve.trace`` timing lines from the TimingMiddleware,
uvicorn's access line); ``--request-logs`` keeps KServe's defaults.
KServe hard-codes the HTTP listen address to 0.0.0.0 (``kserve.protocol.rest.server.RESTServer``); this script
swaps in a RESTServer subclass that listens on 127.0.0.1 (``--host``) instead, so nothing is exposed.

JSON requests without a Content-Type header: KServe's V2 infer route takes ``Union[InferenceRequest, bytes]``, and
FastAPI >= 0.132 defaults to ``strict_content_type=True``, so a JSON body sent without ``Content-Type:
application/json`` reaches KServe as bytes and is rejected (400 "...'inference-header-content-length' header is
missing"). tritonclient.http sends no Content-Type at all, so its JSON mode (``binary_data=False``) fails against a
stock KServe server. ``JsonContentTypeDefault`` below marks such a request (POST, no Content-Type, no
Inference-Header-Content-Length) as JSON; binary requests and requests that carry a Content-Type pass untouched.
This is FastAPI's pre-0.132 behaviour, which gives up its CSRF guard for header-less bodies; acceptable for a
loopback-only benchmark server running a stateless model. ``--strict-content-type`` leaves KServe/FastAPI as shipped
(then send ``headers={"Content-Type": "application/json"}`` with JSON-mode tritonclient requests).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

# Importing kserve.model_server parses sys.argv with KServe's own parser (parse_known_args, abbreviations allowed):
# our --model is read there as --model_name, which nothing here uses; every ModelServer setting is passed explicitly.
import kserve
import kserve.model_server
import numpy as np
import onnxruntime as ort
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer

INPUT_NAME = "input"
OUTPUT_NAMES = ("probabilities", "embedding")


class VisionloopOnnxModel(kserve.Model):
    """A visionloop classifier export (model.onnx + model_card.json) as a KServe V2 model."""

    def __init__(self, name: str, model_path: Path, card_path: Path, threads: int | None = None) -> None:
        super().__init__(name)
        self.model_path = model_path
        self.card_path = card_path
        self.threads = threads
        self.session: ort.InferenceSession | None = None
        self.chw: tuple[int, int, int] = (0, 0, 0)
        self.load()

    def load(self) -> bool:
        card = json.loads(self.card_path.read_text())
        size = int(card["image_size"])
        self.chw = (int(card["channels"]), size, size)
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.ready = True
        return self.ready

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the V2 protocol only: POST /v2/models/{name}/infer")
        infer_input = payload.get_input_by_name(INPUT_NAME)
        if infer_input is None or len(payload.inputs) != 1:
            raise InvalidInput(f'expected exactly one input named "{INPUT_NAME}"')
        if infer_input.datatype != "UINT8":
            raise InvalidInput(f'input "{INPUT_NAME}" must be UINT8, got {infer_input.datatype}')
        shape = tuple(int(d) for d in infer_input.shape)
        if len(shape) != 4 or shape[1:] != self.chw:
            raise InvalidInput(
                f'input "{INPUT_NAME}" must have shape [N, {", ".join(map(str, self.chw))}], got {list(shape)}'
            )
        pixels = infer_input.as_numpy()
        x = pixels.astype(np.float32) / np.float32(255.0)
        assert self.session is not None
        results = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        outputs = [
            InferOutput(name=name, shape=list(arr.shape), datatype="FP32", data=np.ascontiguousarray(arr, np.float32))
            for name, arr in zip(OUTPUT_NAMES, results, strict=True)
        ]
        # KServe's REST encoder honours each requested output's binary_data flag (and the request-level
        # binary_data_output parameter) when it turns this response into JSON or JSON + binary tail.
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


class JsonContentTypeDefault:
    """ASGI middleware: a POST with neither Content-Type nor Inference-Header-Content-Length is JSON."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            names = {name for name, _ in scope["headers"]}
            if b"content-type" not in names and b"inference-header-content-length" not in names:
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def loopback_rest_server(host: str) -> type[RESTServer]:
    """A RESTServer whose uvicorn config listens on ``host`` instead of KServe's hard-coded 0.0.0.0."""

    class LoopbackRESTServer(RESTServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn reads config.host when the server binds (serve -> startup), after this constructor.
            self.config.host = host

    return LoopbackRESTServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx of a visionloop export")
    parser.add_argument("--card", type=Path, required=True, help="model_card.json of the same export")
    parser.add_argument("--port", type=int, default=8090, help="HTTP port (default 8090)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--name", default="visionloop-classifier", help="model name in the V2 URLs")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    parser.add_argument("--request-logs", action="store_true", help="keep KServe's per-request log lines")
    parser.add_argument(
        "--strict-content-type",
        action="store_true",
        help="do not treat header-less POST bodies as JSON (tritonclient's JSON mode then fails)",
    )
    args = parser.parse_args(argv)

    model = VisionloopOnnxModel(args.name, args.model, args.card, threads=args.threads)
    kserve.model_server.RESTServer = loopback_rest_server(args.host)
    server = kserve.ModelServer(
        http_port=args.port,
        workers=1,
        enable_grpc=False,
        enable_docs_url=False,
        enable_latency_logging=args.request_logs,
    )
    if not args.strict_content_type:
        kserve.model_server.app.add_middleware(JsonContentTypeDefault)
    if not args.request_logs:
        for logger_name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(logger_name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
