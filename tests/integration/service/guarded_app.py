"""A test-only app on the shared service layer, run as a real uvicorn process by the tests beside it.

``python guarded_app.py '<HttpSettings as JSON>'`` serves, on 127.0.0.1 and a free port, with exactly what
``visionloop serve|monitor|loop`` get from ``visionloop.service`` (guard, protocol limits, Host check):

- ``GET /healthz``: the probe;
- ``GET /boom``: a route that raises (what a bug looks like);
- ``POST /echo``: reads its whole body; needs ``Authorization: Bearer test-token``;
- ``GET /metrics``: the guard's counters (``test_http_*``).

It prints ``listening on http://127.0.0.1:PORT`` once it accepts connections. Importing nothing but the
service layer keeps its start-up well under a second (no MLflow, no model).
"""

from __future__ import annotations

import json
import logging
import sys

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from visionloop.config import HttpSettings
from visionloop.service.app import guard_side_service
from visionloop.service.guard import TokenRule
from visionloop.service.metrics import HttpMetrics
from visionloop.service.server import configure_logging, run_server

TOKEN = "test-token"


def main() -> None:
    http = HttpSettings(**json.loads(sys.argv[1]))
    log = logging.getLogger("visionloop.test")
    configure_logging(log)
    registry = CollectorRegistry()
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug in a route")

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    rule = TokenRule("POST", "/echo", TOKEN, "POST /echo needs 'Authorization: Bearer test-token'")
    guard_side_service(app, metrics=HttpMetrics(registry, "test"), http=http, tokens=[rule], log=log)
    run_server(
        app, host="127.0.0.1", port=0, http=http, on_started=lambda url, _app: print(f"listening on {url}", flush=True)
    )


if __name__ == "__main__":
    main()
