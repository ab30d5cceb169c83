"""The serving process itself: it runs without torch, scikit-learn or kfp, and SIGTERM lets in-flight
requests finish."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from serving_helpers import publish, settings_for  # this folder is on sys.path (no __init__.py)

# A meta-path hook that makes `import torch`, `import sklearn` and `import kfp` fail, as in a serving image
# without training's dependencies installed.
NO_TORCH = """
import sys
BLOCKED = ("torch", "sklearn", "kfp")
class _NotInTheServingImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in the serving image")
sys.meta_path.insert(0, _NotInTheServingImage())
"""
NOTHING_BLOCKED_IMPORTED = (
    "leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)\nassert not leaked, f'imported: {leaked}'\n"
)
ROUTE_MODULES = ["predict", "feedback", "ops", "v2"]


def test_the_serving_package_imports_without_torch_sklearn_or_kfp():
    code = NO_TORCH + (
        "import visionloop.cli, visionloop.serving.app, visionloop.serving.server\n"
        + NOTHING_BLOCKED_IMPORTED
        + "for name in BLOCKED:\n"
        "    try:\n        __import__(name)\n    except ImportError:\n        print(name, 'blocked')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["torch blocked", "sklearn blocked", "kfp blocked"]


@pytest.mark.parametrize("module", ROUTE_MODULES)
def test_each_route_module_imports_on_its_own(module):
    # a fresh interpreter: nothing (not the app) has been imported before the router module
    code = NO_TORCH + (
        f"from visionloop.serving.api.routes.{module} import router\n"
        + NOTHING_BLOCKED_IMPORTED
        + "assert 'visionloop.serving.app' not in sys.modules\n"
        "print(' '.join(sorted({r.path for r in router.routes})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    paths = set(result.stdout.split())
    expected = {
        "predict": {"/predict"},
        "feedback": {"/feedback"},
        "ops": {"/healthz", "/readyz", "/metrics", "/admin/reload"},
        "v2": {"/v2", "/v2/health/live", "/v2/models/{name}/versions/{version}/infer"},
    }[module]
    assert expected <= paths, paths


def test_a_server_without_torch_answers_predict_and_v2(
    tmp_path, start_server, strong_export, digits_dataset, digit_png
):
    settings = settings_for(tmp_path / "home")
    publish(settings, strong_export, digits_dataset)
    launcher = [
        sys.executable,
        "-c",
        NO_TORCH + "from visionloop.cli import main\nmain()",
        "--home",
        str(settings.home),
    ]
    server = start_server(settings, "--poll-seconds", "0", command=launcher)
    png, label = digit_png
    with server.client() as http:
        answer = http.post("/predict", files={"file": ("x.png", png)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] == str(label)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x_test, _ = digits_dataset.part("test")
    tensor = triton.InferInput("input", [4, 1, 16, 16], "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(x_test[:4]))
    assert client.infer(settings.registry.model_name, [tensor]).as_numpy("probabilities").shape == (4, 10)
    assert "Traceback" not in server.log


def test_sigterm_lets_an_in_flight_request_finish_then_exits_cleanly(
    tmp_path, start_server, strong_export, digits_dataset, digit_png
):
    settings = settings_for(tmp_path / "home")
    publish(settings, strong_export, digits_dataset)
    server = start_server(settings, "--poll-seconds", "0")
    png, _ = digit_png
    boundary = "visionloop-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    first_part_sent, terminated = threading.Event(), threading.Event()

    def slow_body():  # no Content-Length: sent chunked, the second half only after SIGTERM
        yield head + png[: len(png) // 2]
        first_part_sent.set()
        terminated.wait(30)
        yield png[len(png) // 2 :] + f"\r\n--{boundary}--\r\n".encode()

    outcome: dict[str, object] = {}

    def send() -> None:
        try:
            response = httpx.post(
                f"{server.url}/predict",
                content=slow_body(),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                timeout=60,
            )
            outcome["status"], outcome["body"] = response.status_code, response.json()
        except Exception as exc:  # recorded, asserted on below
            outcome["error"] = repr(exc)

    sender = threading.Thread(target=send)
    sender.start()
    assert first_part_sent.wait(30)
    time.sleep(0.5)  # the server is now reading this request's body
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    terminated.set()
    sender.join(60)
    assert outcome.get("status") == 200, outcome
    assert outcome["body"]["predictions"][0]["label"]  # type: ignore[index]
    assert server.process.wait(timeout=60) == 0
    # and it is really gone: nothing listens any more
    try:
        httpx.get(f"{server.url}/healthz", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.ConnectError:
        pass
