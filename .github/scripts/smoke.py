#!/usr/bin/env python3
"""Smoke test of a running `visionloop serve`: liveness, readiness, and one KServe V2 inference.

    python3 .github/scripts/smoke.py [BASE_URL] [--model NAME] [--timeout SECONDS]

BASE_URL defaults to http://127.0.0.1:8000 (e.g. a `kubectl port-forward svc/...` in cd.yml). The checks:

1. GET /healthz answers 200 (retried until the deadline: the server may still be starting);
2. GET /v2/health/ready answers 200 (retried: a server without a model answers 503; the reason that
   GET /readyz gives is printed when it never becomes ready);
3. GET /v2/models/NAME gives the model's input (name, datatype, shape); NAME is --model, else the model
   that /readyz says is served;
4. POST /v2/models/NAME/infer with a generated input of that shape (batch 2) and datatype, as JSON; every
   output of the metadata must come back with the right shape and as many values, all finite numbers.

Exit 0 when all pass; 1 with one "smoke: FAIL: ..." line on stderr at the first failure; 2 for bad usage.
Every retry is bounded by --timeout (total seconds) and every request by --request-timeout. Only the
Python standard library: it runs on a bare GitHub runner.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
BATCH = 2
INTEGER_RANGES = {
    "UINT8": (0, 255), "UINT16": (0, 65535), "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**32 - 1),
    "INT8": (-128, 127), "INT16": (-32768, 32767), "INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**31), 2**31 - 1),
}  # fmt: skip
FLOATS = {"FP16", "FP32", "FP64"}


class SmokeFailure(Exception):
    """A check failed; the message says which and why."""


class Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self, what: str) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise SmokeFailure(f"{what} did not answer JSON: {self.body[:200]!r}") from None


def request(url: str, timeout: float, data: bytes | None = None) -> Response:
    """One HTTP request; an HTTP error status is an answer, a network failure raises OSError."""
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return Response(answer.status, answer.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read())


def reason_of(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None)
    if isinstance(inner, BaseException):
        exc = inner
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


class Smoke:
    def __init__(self, base_url: str, timeout: float, request_timeout: float, interval: float) -> None:
        self.base = base_url.rstrip("/")
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.interval = interval

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, path: str, data: bytes | None = None) -> Response:
        """One request now, within what is left of the deadline."""
        url = self.base + path
        try:
            return request(url, max(0.5, min(self.request_timeout, self.left())), data)
        except OSError as exc:
            raise SmokeFailure(f"cannot reach {url}: {reason_of(exc)}") from None

    def wait_for(self, path: str, hint: str = "") -> Response:
        """GET ``path`` until it answers 200, or fail when the deadline passes."""
        url = self.base + path
        last = "no answer yet"
        while True:
            try:
                answer = request(url, max(0.5, min(self.request_timeout, self.left())))
                if answer.status == 200:
                    return answer
                last = f"HTTP {answer.status} {answer.body[:200].decode(errors='replace')}"
            except OSError as exc:
                last = f"cannot connect: {reason_of(exc)}"
            if self.left() <= self.interval:
                extra = f"; {hint}" if hint else ""
                raise SmokeFailure(f"GET {url} did not answer 200 within {self.timeout:g} s (last: {last}){extra}")
            time.sleep(self.interval)

    def readiness_reason(self) -> str:
        try:
            body = self.call("/readyz").json("GET /readyz")
        except SmokeFailure as exc:
            return str(exc)
        return f"/readyz says: {json.dumps(body)}"

    def served_model(self) -> str:
        body = self.call("/readyz").json("GET /readyz")
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, dict) or not model.get("name"):
            raise SmokeFailure(f"GET /readyz names no served model: {json.dumps(body)}; pass --model NAME")
        return str(model["name"])


def generated(datatype: str, count: int) -> list[Any]:
    """``count`` deterministic values of a V2 ``datatype`` (a ramp over the type's range, or over 0..1)."""
    if datatype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[datatype]
        span = min(high - low, 255)
        return [low + (i * 37) % (span + 1) for i in range(count)]
    if datatype in FLOATS:
        return [((i * 37) % 256) / 255.0 for i in range(count)]
    if datatype == "BOOL":
        return [i % 2 == 0 for i in range(count)]
    raise SmokeFailure(f"cannot generate an input of datatype {datatype!r}")


def concrete(shape: Any, what: str) -> list[int]:
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) for d in shape):
        raise SmokeFailure(f"{what} has no usable shape: {shape!r}")
    return [BATCH if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(shape)]


def check_infer(metadata: dict, answer: dict, name: str) -> list[str]:
    """The lines to print about a good answer; raises SmokeFailure on a bad one."""
    if answer.get("model_name") != name:
        raise SmokeFailure(f"infer answered for model {answer.get('model_name')!r}, not {name!r}")
    outputs = answer.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise SmokeFailure(f"infer answer has no outputs: {json.dumps(answer)[:300]}")
    by_name = {o.get("name"): o for o in outputs if isinstance(o, dict)}
    lines = []
    for declared in metadata.get("outputs") or []:
        out_name = declared.get("name")
        got = by_name.get(out_name)
        if got is None:
            raise SmokeFailure(f"infer answer lacks output {out_name!r} (got {sorted(map(str, by_name))})")
        expected = concrete(declared.get("shape"), f"output {out_name!r} in the metadata")
        shape = got.get("shape")
        if not isinstance(shape, list) or len(shape) != len(expected) or shape[0] != BATCH:
            raise SmokeFailure(f"output {out_name!r} has shape {shape}, expected {expected}")
        if any(d > 0 and s != e for d, s, e in zip(declared["shape"], shape, expected, strict=True)):
            raise SmokeFailure(f"output {out_name!r} has shape {shape}, expected {expected}")
        data = got.get("data")
        if not isinstance(data, list) or len(data) != math.prod(shape):
            size = len(data) if isinstance(data, list) else data
            raise SmokeFailure(f"output {out_name!r} of shape {shape} came with {size} values")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in data):
            raise SmokeFailure(f"output {out_name!r} holds values that are not finite numbers")
        lines.append(f"output {out_name} {got.get('datatype')} {shape}")
    return lines


def run(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """The checks in order; ``say`` gets a line for each one passed."""
    smoke = Smoke(args.base_url, args.timeout, args.request_timeout, args.interval)
    smoke.wait_for("/healthz")
    say(f"GET /healthz 200 ({smoke.base})")
    try:
        smoke.wait_for("/v2/health/ready")
    except SmokeFailure as exc:
        raise SmokeFailure(f"{exc}; {smoke.readiness_reason()}") from None
    say("GET /v2/health/ready 200")
    name = args.model or smoke.served_model()
    answer = smoke.call(f"/v2/models/{name}")
    if answer.status != 200:
        raise SmokeFailure(f"GET /v2/models/{name} gave HTTP {answer.status}: {answer.body[:300]!r}")
    metadata = answer.json(f"GET /v2/models/{name}")
    inputs = metadata.get("inputs") if isinstance(metadata, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise SmokeFailure(f"GET /v2/models/{name} declares no inputs: {json.dumps(metadata)[:300]}")
    request_inputs = []
    for spec in inputs:
        shape = concrete(spec.get("shape"), f"input {spec.get('name')!r}")
        datatype = str(spec.get("datatype"))
        request_inputs.append(
            {
                "name": spec.get("name"),
                "shape": shape,
                "datatype": datatype,
                "data": generated(datatype, math.prod(shape)),
            }
        )
        versions = ",".join(map(str, metadata.get("versions") or []))
        say(f"model {name} v{versions}: input {spec.get('name')} {datatype} {spec.get('shape')}")
    body = json.dumps({"id": "smoke", "inputs": request_inputs}).encode()
    answer = smoke.call(f"/v2/models/{name}/infer", body)
    if answer.status != 200:
        raise SmokeFailure(f"POST /v2/models/{name}/infer gave HTTP {answer.status}: {answer.body[:300]!r}")
    for line in check_infer(metadata, answer.json(f"POST /v2/models/{name}/infer"), name):
        say(line)
    say(f"POST /v2/models/{name}/infer 200 (batch {BATCH})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", nargs="?", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    parser.add_argument("--model", help="model name (default: the one GET /readyz says is served)")
    parser.add_argument("--timeout", type=float, default=180.0, help="total seconds for all retries (default 180)")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between retries (default 2)")
    args = parser.parse_args(argv)
    if not args.base_url.startswith(("http://", "https://")):
        parser.error(f"BASE_URL must start with http:// or https://, got {args.base_url!r}")
    if args.timeout <= 0 or args.request_timeout <= 0 or args.interval <= 0:
        parser.error("--timeout, --request-timeout and --interval must be positive")
    try:
        run(args, lambda line: print(f"smoke: ok: {line}", flush=True))
    except SmokeFailure as exc:
        print(f"smoke: FAIL: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"smoke: passed against {args.base_url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
