"""Hostile traffic against a real ``visionloop serve``: the server stays alive, says when it is full, refuses bad values.

- Three clients post 4900x4900 PNGs (about 200 KB each, a quarter of a second of CPU to decode) and two post
  16 MB V2 JSON bodies, while a prober asks /healthz every 0.2 s and a legitimate client keeps predicting:
  every probe answers (within 2 s, twice Kubernetes' default probe timeout: today's code held the event
  loop for seconds per V2 body) and every legitimate request succeeds.
- A full decode queue answers 503 with Retry-After; NaN pixels are a 422; JSON Python cannot parse a 400.
- /feedback during a store outage (PostgreSQL on a port nothing listens on) does not hold up /predict.

Loops are bounded in count; no assertion is on a duration (the probe timeout is a liveness verdict).
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

PROBE_TIMEOUT_S = 2.0  # a liveness probe that waits longer than this has failed (Kubernetes' default is 1 s)
HUGE_SIDE = 4900
SHAPE = [1, 1, 16, 16]  # the digits model: UINT8 [N, 1, 16, 16]


def huge_png(seed: int = 0) -> bytes:
    """A 4900x4900 RGB PNG of about 200 KB: flat but for a noisy corner, so it compresses and costs to decode."""
    rgb = np.zeros((HUGE_SIDE, HUGE_SIDE, 3), np.uint8)
    rgb[:200, :200] = np.random.default_rng(seed).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def big_v2_json(megabytes: float = 15.9) -> bytes:
    """A V2 JSON body of ``megabytes`` MiB (under the default 16 MiB cap) of pixel values: seconds to parse."""
    count = int(megabytes * 2**20) // 2
    return (
        '{"inputs":[{"name":"input","shape":[1,1,16,16],"datatype":"UINT8","data":[' + "0," * (count - 1) + "0]}]}"
    ).encode()


def v2_json(data_text: str) -> bytes:
    header = '{"inputs":[{"name":"input","shape":' + json.dumps(SHAPE) + ',"datatype":"UINT8","data":'
    return (header + data_text + "}]}").encode()


@pytest.fixture(scope="module")
def hostile_server(request: pytest.FixtureRequest, champion_settings) -> Iterator[Any]:
    """One server, with a decode queue of one huge image and every JSON body parsed in the worker process."""
    conftest = request.config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    server = conftest.launch(
        champion_settings.home,
        "--model-name", champion_settings.registry.model_name,
        "--poll-seconds", "0",
        "--set", f"serve.decode_queue_pixels={HUGE_SIDE * HUGE_SIDE + 1}",
        "--set", "serve.parse_inline_kb=0",
    )  # fmt: skip
    yield server
    server.stop()


def v2_url(settings) -> str:
    return f"/v2/models/{settings.registry.model_name}/infer"


def run_until(stop: threading.Event, rounds: int, step: Callable[[], None]) -> None:
    for _ in range(rounds):
        if stop.is_set():
            return
        step()


def test_health_and_legitimate_requests_are_served_while_hostile_clients_run(
    hostile_server, champion_settings, digit_png
):
    png, _ = digit_png
    huge, big = huge_png(), big_v2_json()
    hostile: list[tuple[str, int | str, str | None]] = []
    probes: list[int | str] = []
    legit: list[int | str] = []
    stop = threading.Event()

    def post_huge(client: httpx.Client) -> None:
        answer = client.post("/predict", files={"file": ("huge.png", huge)})
        hostile.append(("png", answer.status_code, answer.headers.get("retry-after")))

    def post_big(client: httpx.Client) -> None:
        try:
            answer = client.post(v2_url(champion_settings), content=big, headers={"content-type": "application/json"})
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            # refused from its Content-Length before the body was read; the server may close the connection
            # while the client is still sending, and the client then sees the close instead of the 413
            hostile.append(("v2", "closed unread", None))
            return
        hostile.append(("v2", answer.status_code, answer.headers.get("retry-after")))

    def attacker(post: Callable[[httpx.Client], None], rounds: int) -> None:
        with hostile_server.client(timeout=120) as client:
            for _ in range(rounds):
                post(client)

    def prober() -> None:
        with hostile_server.client(timeout=PROBE_TIMEOUT_S) as client:

            def probe() -> None:
                try:
                    probes.append(client.get("/healthz").status_code)
                except httpx.TimeoutException:
                    probes.append("timeout")
                time.sleep(0.2)

            run_until(stop, 600, probe)

    def legitimate() -> None:
        with hostile_server.client(timeout=60) as client:

            def predict() -> None:
                try:
                    legit.append(client.post("/predict", files={"file": ("ok.png", png)}).status_code)
                except httpx.TimeoutException:
                    legit.append("timeout")
                time.sleep(0.05)

            run_until(stop, 2000, predict)

    with ThreadPoolExecutor(7) as pool:
        background = [pool.submit(prober), pool.submit(legitimate)]
        attacks = [pool.submit(attacker, post_huge, 4) for _ in range(3)]
        attacks += [pool.submit(attacker, post_big, 3) for _ in range(2)]
        for attack in attacks:
            attack.result(timeout=300)
        stop.set()
        for job in background:
            job.result(timeout=60)

    assert len(hostile) == 3 * 4 + 2 * 3
    assert probes and all(status == 200 for status in probes), probes
    assert legit and all(status == 200 for status in legit), legit
    for kind, status, retry_after in hostile:
        # a huge PNG is decoded (200) or refused while the decode queue is full (503 + Retry-After); a V2 body
        # longer than any valid request for this model is refused unread (413, or the connection closed)
        assert (kind, status) in {("png", 200), ("png", 503), ("v2", 413), ("v2", "closed unread")}, hostile
        assert (status == 503) == (retry_after == "1")
    with hostile_server.client() as client:
        metrics = client.get("/metrics").text
    refused = sum(status == 503 for _, status, _ in hostile)
    assert f'visionloop_overloaded_total{{queue="decode"}} {refused:.1f}' in metrics or refused == 0


def test_a_full_decode_queue_answers_503_with_retry_after(hostile_server):
    huge = huge_png(1)
    answers: list[httpx.Response] = []

    def post(_: int) -> httpx.Response:
        with hostile_server.client(timeout=120) as client:
            return client.post("/predict", files={"file": ("huge.png", huge)})

    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):  # the queue takes one huge image; four at once cannot all fit
            answers += pool.map(post, range(4))
            if any(a.status_code == 503 for a in answers):
                break
    busy = [a for a in answers if a.status_code == 503]
    assert busy, [a.status_code for a in answers]
    assert all(a.status_code in (200, 503) for a in answers)
    assert busy[0].headers["retry-after"] == "1"
    assert "the decode queue holds" in busy[0].json()["error"]


def nan_tiff() -> bytes:
    array = np.full((16, 16), 0.5, np.float32)
    array[3, 3] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(array, "F").save(buffer, format="TIFF")
    return buffer.getvalue()


def test_a_float_tiff_holding_nan_is_a_422_naming_it(hostile_server):
    with hostile_server.client() as client:
        answer = client.post("/predict", files={"file": ("nan.tiff", nan_tiff())})
    assert answer.status_code == 422, answer.text
    assert "non-finite pixel values" in answer.json()["error"]


@pytest.mark.parametrize(
    ("data_text", "message"),
    [
        ("[" + "1" * 4301 + "]", "more than 4,300 digits"),
        ("[NaN" + ",0" * 255 + "]", "non-finite number NaN"),
        ("[Infinity" + ",0" * 255 + "]", "non-finite number Infinity"),
        ("[0,", "not valid JSON"),
    ],
)
def test_v2_json_python_cannot_parse_is_a_400(hostile_server, champion_settings, data_text, message):
    with hostile_server.client() as client:
        answer = client.post(
            v2_url(champion_settings), content=v2_json(data_text), headers={"content-type": "application/json"}
        )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]


def test_v2_json_parsed_in_the_worker_process_answers_like_binary(hostile_server, champion_settings):
    pixels = np.arange(256, dtype=np.uint8).reshape(SHAPE)
    header = {
        "inputs": [{"name": "input", "shape": SHAPE, "datatype": "UINT8", "parameters": {"binary_data_size": 256}}]
    }
    head = json.dumps(header).encode()
    with hostile_server.client() as client:
        as_json = client.post(v2_url(champion_settings), content=v2_json(json.dumps(pixels.reshape(-1).tolist())))
        as_binary = client.post(
            v2_url(champion_settings),
            content=head + pixels.tobytes(),
            headers={"inference-header-content-length": str(len(head))},
        )
    assert as_json.status_code == 200, as_json.text
    assert as_binary.status_code == 200, as_binary.text
    probabilities = {o["name"]: o["data"] for o in as_json.json()["outputs"]}["probabilities"]
    assert probabilities == {o["name"]: o["data"] for o in as_binary.json()["outputs"]}["probabilities"]


def test_predict_json_parsed_in_the_worker_process_answers_like_multipart(hostile_server, digit_png):
    png, _ = digit_png
    with hostile_server.client() as client:
        as_json = client.post("/predict", json={"images": [base64.b64encode(png).decode()]})
        as_file = client.post("/predict", files={"file": ("x.png", png)})
        bad = client.post("/predict", json={"images": ["not base64!"]})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["predictions"][0]["top_k"] == as_file.json()["predictions"][0]["top_k"]
    assert bad.status_code == 422 and bad.json()["error"] == "images[0] is not valid base64"


def noisy_png(side: int = 300) -> bytes:
    """About 270 KB of noise: over the inline byte limit, so it decodes off the event loop."""
    rgb = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


@pytest.fixture
def hung_database() -> Iterator[int]:
    """A port where connections are taken (by the kernel's backlog) and never answered: a PostgreSQL that hangs,
    so every store call waits its full timeout, as with a database host that went away."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock.getsockname()[1]


def test_feedback_during_a_store_outage_does_not_hold_up_predict(
    start_server, champion_settings, digit_png, hung_database
):
    png, label = digit_png
    down = f"postgresql://visionloop:secret@127.0.0.1:{hung_database}/predictions"
    server = start_server(
        champion_settings, "--poll-seconds", "0",
        "--set", f"monitor.store_url={down}",
        "--set", "monitor.store_timeout_seconds=2",
        "--set", "monitor.keep_images=false",
        "--set", "serve.feedback_queue=2",  # two label writes wait on the store (a few seconds); the rest get 503
    )  # fmt: skip
    upload = noisy_png()
    assert len(upload) > 256 * 1024
    finished: dict[str, float] = {}
    answers: dict[str, httpx.Response] = {}

    def call(key: str, method: Callable[[httpx.Client], httpx.Response]) -> None:
        with server.client(timeout=120) as client:
            answers[key] = method(client)
        finished[key] = time.monotonic()

    with server.client() as client:
        request_id = client.post("/predict", files={"file": ("x.png", png)}).json()["predictions"][0]["request_id"]
    body = {"request_id": request_id, "label": str(label)}
    with ThreadPoolExecutor(11) as pool:
        # ten label writes for the dead store: more than the default thread pool of a small machine holds
        for i in range(10):
            pool.submit(call, f"feedback-{i}", lambda c: c.post("/feedback", json=body))
        time.sleep(0.5)  # pacing only: let them reach the server first
        pool.submit(call, "predict", lambda c: c.post("/predict", files={"file": ("noise.png", upload)}))
    assert answers["predict"].status_code == 200, answers["predict"].text
    for key, answer in answers.items():
        if key.startswith("feedback"):
            assert answer.status_code == 503, answer.text
            assert answer.headers.get("retry-after") == "1" or "store" in answer.json()["error"], answer.text
    waited = [k for k, a in answers.items() if k.startswith("feedback") and "server busy" not in a.json()["error"]]
    assert waited, "no feedback call reached the store"
    # the label writes that waited on the store answered after the prediction that came later
    assert all(finished[k] > finished["predict"] for k in waited), (finished, {k: answers[k].text for k in waited})


def test_worker_processes_exit_when_the_server_is_killed(start_server, champion_settings):
    server = start_server(champion_settings, "--poll-seconds", "0")
    workers: list[psutil.Process] = []
    for _ in range(100):  # the decode and V2 workers start in the background at start-up
        workers = [p for p in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        if len(workers) >= 2:
            break
        time.sleep(0.2)
    assert len(workers) >= 2, psutil.Process(server.process.pid).children()
    server.stop(signal.SIGKILL)  # no cleanup runs in the server: the workers must notice by themselves
    _gone, still = psutil.wait_procs(workers, timeout=20)
    assert not still, still
