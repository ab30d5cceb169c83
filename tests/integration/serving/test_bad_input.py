"""A corpus of malformed images and requests, each sent to a real ``visionloop serve``.

Every case must get its 4xx (or, for the few valid-but-unusual ones, a 200) and an ``{"error": ...}``
body whose message names the problem. One server serves the whole module, started with small limits
(so bombs, oversized bodies and too-many-images are cheap to build) and an admin token.
Cases marked ``bug`` are real server bugs, kept as strict xfails until src is fixed.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

MAX_PIXELS, MAX_IMAGES, MAX_BODY_MB = 10_000, 3, 0.05  # 0.05 MiB = 52,428 bytes
TOKEN = "s3cret-admin-token"
SHAPE = [1, 1, 16, 16]  # the digits model: UINT8 [N, 1, 16, 16]


# ----------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def strict_server(request: pytest.FixtureRequest, champion_settings) -> Iterator[Any]:
    # start_server is function-scoped; launch it once for the module instead. The serving conftest is
    # not importable by name (tests/ has no packages), so take it from pytest's plugin manager.
    conftest = request.config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    server = conftest.launch(
        champion_settings.home,
        "--model-name", champion_settings.registry.model_name,
        "--poll-seconds", "0",
        "--set", f"serve.max_pixels={MAX_PIXELS}",
        "--set", f"serve.max_images={MAX_IMAGES}",
        "--set", f"serve.max_body_mb={MAX_BODY_MB}",
        "--set", f"serve.admin_token={TOKEN}",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def request_id(strict_server) -> str:
    """The id of a real prediction, for the feedback cases."""
    with strict_server.client() as http:
        answer = http.post("/predict", files={"file": ("ok.png", GREY_PNG)})
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"][0]["request_id"]


# ----------------------------------------------------------------------------------- images
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(img: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(mode: str, size: int = 32, seed: int = 0) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, bands), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels).convert(mode)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height grey pixels, followed by a few bytes of data: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def bmp_claiming(width: int, height: int) -> bytes:
    """A 24-bit BMP header declaring width×height, with 16 bytes of pixel data."""
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + dib + bytes(16)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its SOF0 frame size patched to width×height."""
    data = bytearray(encode(noise("L", 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_with_text_bomb(unpacked: int) -> bytes:
    """An 8x8 PNG whose zTXt comment inflates to ``unpacked`` bytes (Pillow refuses text over MAX_TEXT_CHUNK)."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    text = b"Comment\0\0" + zlib.compress(bytes(unpacked), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"zTXt", text)
        + chunk(b"IDAT", zlib.compress(bytes(72))) + chunk(b"IEND", b"")
    )  # fmt: skip


def ico_around(png: bytes) -> bytes:
    """An ICO file with one entry (declared 256x256) holding ``png``."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def corrupt_idat(png: bytes) -> bytes:
    """Flip eight bytes in the middle of the (first) IDAT chunk's compressed data."""
    start = png.index(b"IDAT") + 4
    middle = start + struct.unpack(">I", png[start - 8 : start - 4])[0] // 2
    return png[:middle] + bytes(b ^ 0xFF for b in png[middle : middle + 8]) + png[middle + 8 :]


GREY_PNG = encode(noise("L"))
GRADIENT_PNG = encode(Image.fromarray((np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)))
NOISE_PNG = encode(noise("L", 64))  # ~4 KiB: truncating it leaves a valid header and half the pixels
NOISE_JPEG = encode(noise("L", 64), "JPEG", quality=90)
RGBA_PNG, P_PNG, RGB_PNG = encode(noise("RGBA")), encode(noise("RGB").convert("P")), encode(noise("RGB"))


# ----------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str  # "{model}" is replaced by the served model's name
    status: int
    says: str  # a distinctive part of the error message (of the body, for a 2xx)
    kwargs: dict = field(default_factory=dict)  # for httpx.Client.request; "{request_id}" in json is filled in
    chunked: int = 0  # when set, send this many bytes as a chunked stream (no Content-Length)
    bug: str = ""  # a server bug this case shows: strict xfail


def upload(name: str, status: int, says: str, *files: tuple[str, bytes], **params: str) -> Case:
    """POST /predict with multipart file fields named "file"; ``params`` go in the query string."""
    return Case(name, "POST", "/predict", status, says, {"files": [("file", f) for f in files], "params": params})


def raw(content: bytes, content_type: str | None = "application/json", **headers: str) -> dict:
    """Request kwargs for a body sent as it is."""
    return {"content": content, "headers": {"content-type": content_type, **headers} if content_type else headers}


def predict(name: str, status: int, says: str, body: Any, **extra: Any) -> Case:
    """POST /predict with a JSON body, or with ``raw(...)`` kwargs."""
    kwargs = body if isinstance(body, dict) and "content" in body else {"json": body}
    return Case(name, "POST", "/predict", status, says, kwargs, **extra)


def infer(name: str, status: int, says: str, body: Any, path: str = "/v2/models/{model}/infer", bug: str = "") -> Case:
    """POST a V2 infer request: a JSON body, or ``raw(...)`` kwargs."""
    kwargs = body if isinstance(body, dict) and "content" in body else {"json": body}
    return Case(name, "POST", path, status, says, kwargs, bug=bug)


def feedback(name: str, status: int, says: str, body: Any, **extra: Any) -> Case:
    kwargs = body if isinstance(body, dict) and "content" in body else {"json": body}
    return Case(name, "POST", "/feedback", status, says, kwargs, **extra)


def tensor(name: str = "input", datatype: str = "UINT8", shape: list[int] = SHAPE, data: Any = None) -> dict:
    """One V2 input; ``data`` defaults to zeros of the right count."""
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "data": [0] * int(np.prod(shape)) if data is None else data,
    }


def inputs(*tensors: dict, **extra: Any) -> dict:
    return {"inputs": list(tensors), **extra}


def bearer(token: str) -> dict:
    return {"headers": {"authorization": f"Bearer {token}"}}


def multipart(*parts: tuple[str, str | None, bytes]) -> dict:
    """A hand-made multipart body: (field, filename or None for a plain field, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--b0undary\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return raw(body + b"--b0undary--\r\n", "multipart/form-data; boundary=b0undary")


def binary_infer(blob: bytes, header_length: int | str | None = None, declared: object = 256) -> dict:
    """A binary-tensor V2 request (JSON header + raw bytes) declaring ``declared`` bytes of UINT8 [1, 1, 16, 16]."""
    spec = {"name": "input", "datatype": "UINT8", "shape": SHAPE, "parameters": {"binary_data_size": declared}}
    header = httpx.Request("POST", "/", json=inputs(spec)).content
    length = str(len(header) if header_length is None else header_length)
    return raw(header + blob, "application/octet-stream", **{"inference-header-content-length": length})


ZEROS = [0] * 255  # with one more value: a full 1x1x16x16 tensor
DEEP = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # 10 KB, well under the body limit, for V2 and /predict
HUGE_INT = b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 16, 16], "data": [1%s, 0]}]}' % (
    b"0" * 400
)
LAB_TIFF = encode(Image.new("LAB", (8, 8)), "TIFF")
ICO_BOMB = ico_around(encode(Image.new("L", (5000, 5000)), optimize=True))  # 24 KB
TEXT_BOMB = png_with_text_bomb(20_000_000)  # 20 KB
I16_PNG = encode(Image.fromarray(np.full((8, 8), 999, np.uint16)))
BOMB_HEADER = png_claiming(200, 200)
RID = {"request_id": "{request_id}"}  # filled in with a real prediction's id
VERSION_7 = "/v2/models/{model}/versions/7"
AT_LEAST_1 = "Input should be greater than or equal to 1"
OVER = "over the limit of 0.05 MiB"
V2_SHAPE = "must have shape [-1, 1, 16, 16] with N >= 1"
UINT8 = "every value must be an integer from 0 to 255"
NOT_NUMBERS = "data must be a (nested) list of numbers"
TOO_MANY = "4 images in one request; the limit is 3"

CASES = [
    # --- /predict: the bytes are not a usable image
    upload("not-an-image", 422, "not an image PIL can read", ("notes.txt", b"just some text, not pixels\n" * 8)),
    upload("zero-bytes", 422, "empty upload (0 bytes)", ("empty.png", b"")),
    upload("svg-is-not-raster", 422, "x.svg: not an image", ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')),
    upload("png-header-cut-short", 422, "cannot read image header", ("cut.png", GREY_PNG[:20])),
    upload("png-zero-width", 422, "not an image PIL can read", ("w0.png", png_claiming(0, 16))),
    upload("truncated-png", 422, "damaged or truncated", ("half.png", NOISE_PNG[: len(NOISE_PNG) * 6 // 10])),
    upload("truncated-jpeg", 422, "damaged or truncated", ("half.jpg", NOISE_JPEG[: len(NOISE_JPEG) // 2])),
    upload("png-corrupt-idat", 422, "damaged or truncated", ("flipped.png", corrupt_idat(GRADIENT_PNG))),
    upload("one-bad-among-good", 422, "bad.png: not an image", ("good.png", GREY_PNG), ("bad.png", b"\x00" * 99)),
    # --- decompression bombs: refused from the header, before any pixel is decoded
    upload("bomb-png-header", 413, "200x200 = 40,000 pixels is over the limit of 10,000", ("b.png", BOMB_HEADER)),
    upload("bomb-png-real", 413, "1000x1000 = 1,000,000 pixels", ("zeros.png", encode(Image.new("L", (1000, 1000))))),
    upload("bomb-png-over-pil-limit", 413, "too many pixels (over 10,000)", ("b.png", png_claiming(20_000, 20_000))),
    upload("bomb-bmp-header", 413, "5000x5000 = 25,000,000 pixels", ("b.bmp", bmp_claiming(5000, 5000))),
    upload("bomb-jpeg-sof", 413, "too many pixels", ("b.jpg", jpeg_claiming(60_000, 60_000))),
    upload("bomb-ico-holding-big-png", 413, "5000x5000 = 25,000,000 pixels", ("b.ico", ICO_BOMB)),
    upload("bomb-png-text-chunk", 422, "cannot read image header: Decompressed data too large", ("t.png", TEXT_BOMB)),
    # --- colour modes: converted as training converted, unless the client says convert=false
    upload("mode-rgba", 422, "image mode RGBA is not what the model takes (L)", ("a.png", RGBA_PNG), convert="false"),
    upload("mode-palette", 422, "image mode P is not what the model takes", ("p.png", P_PNG), convert="false"),
    upload("mode-rgb-for-grey-model", 422, "image mode RGB", ("rgb.png", RGB_PNG), convert="false"),
    upload("mode-16-bit", 422, "image mode I;16", ("i16.png", I16_PNG), convert="false"),
    upload("mode-cmyk-jpeg", 422, "image mode CMYK", ("c.jpg", encode(noise("CMYK"), "JPEG")), convert="false"),
    upload("mode-lab-cannot-convert", 422, "cannot convert image mode LAB to L", ("lab.tif", LAB_TIFF), convert="true"),
    upload("mode-rgba-convert", 200, '"converted":"RGBA->L"', ("a.png", RGBA_PNG), convert="true"),
    upload("mode-palette-convert", 200, '"converted":"P->L"', ("p.png", P_PNG), convert="true"),
    predict("mode-rgb-convert-json", 200, '"converted":"RGB->L"', {"images": [b64(RGB_PNG)], "convert": True}),
    # --- /predict: the request is wrong
    upload("too-many-files", 413, "Too many files", *[(f"{i}.png", GREY_PNG) for i in range(MAX_IMAGES + 1)]),
    predict("too-many-json-images", 413, TOO_MANY, {"images": [b64(GREY_PNG)] * 4}),
    upload("body-over-limit", 413, OVER, ("big.png", bytes(60_000))),
    predict("body-over-limit-chunked", 413, OVER, raw(b""), chunked=60_000),
    predict("json-invalid-base64", 422, "images[1] is not valid base64", {"images": [b64(GREY_PNG), "not*base64!"]}),
    predict("json-base64-not-an-image", 422, "images[0]: not an image", {"images": [b64(b"hello")]}),
    predict("json-not-an-object", 422, "bad JSON body", [b64(GREY_PNG)]),
    predict("json-missing-images", 422, "images: Field required", {"image": [b64(GREY_PNG)]}),
    predict("json-empty-images", 422, "'images' is empty", {"images": []}),
    predict("json-image-not-a-string", 422, "images.0: Input should be a valid string", {"images": [123]}),
    predict("json-top-k-zero", 422, f"bad JSON body: top_k: {AT_LEAST_1}", {"images": ["x"], "top_k": 0}),
    predict("json-syntax-error", 422, "bad JSON body", raw(b'{"images": [')),
    predict("json-nested-too-deeply", 422, "bad JSON body: body: Invalid JSON: recursion limit exceeded", raw(DEEP)),
    predict("content-type-text", 415, "not text/plain", raw(b64(GREY_PNG).encode(), "text/plain")),
    predict("content-type-missing", 415, "not no content type", raw(GREY_PNG, None)),
    predict("multipart-no-files", 422, "no files in the multipart body", multipart(("note", None, b"hello"))),
    predict("multipart-no-boundary", 400, "bad multipart body", raw(b"garbage", "multipart/form-data")),
    upload("query-top-k-zero", 422, f"query.top_k: {AT_LEAST_1}", ("a.png", GREY_PNG), top_k="0"),
    upload(
        "query-convert-not-bool", 422, "query.convert: Input should be a valid bool", ("a.png", GREY_PNG), convert="?"
    ),
    # --- V2 protocol
    infer("v2-wrong-tensor-name", 400, "exactly one input named 'input'; got ['pixels']", inputs(tensor("pixels"))),
    infer("v2-two-inputs", 400, "exactly one input named 'input'", inputs(tensor(), tensor())),
    infer("v2-no-inputs", 400, "non-empty 'inputs' list", inputs()),
    infer("v2-wrong-datatype", 400, "datatype UINT8 (pixels 0-255); got 'FP32'", inputs(tensor("input", "FP32"))),
    infer("v2-wrong-shape", 400, f"{V2_SHAPE}; got [1, 3, 16, 16]", inputs(tensor(shape=[1, 3, 16, 16]))),
    infer("v2-zero-batch", 400, f"{V2_SHAPE}; got [0, 1, 16, 16]", inputs(tensor(shape=[0, 1, 16, 16]))),
    infer("v2-too-many-images", 413, TOO_MANY, inputs(tensor(shape=[4, 1, 16, 16]))),
    infer("v2-data-count", 400, "needs 256 values; data has 255", inputs(tensor(data=ZEROS))),
    infer("v2-value-over-255", 400, UINT8, inputs(tensor(data=[256, *ZEROS]))),
    infer("v2-value-negative", 400, UINT8, inputs(tensor(data=[-1, *ZEROS]))),
    infer("v2-value-fraction", 400, UINT8, inputs(tensor(data=[0.5, *ZEROS]))),
    infer("v2-data-not-numbers", 400, NOT_NUMBERS, inputs(tensor(data=[{"a": 1}] * 256))),
    infer("v2-data-strings", 400, NOT_NUMBERS, inputs(tensor(data=["1"] * 256))),
    infer("v2-data-booleans", 400, NOT_NUMBERS, inputs(tensor(data=[True] * 256))),
    infer("v2-data-not-a-list", 400, NOT_NUMBERS, inputs(tensor(data="0" * 256))),
    infer("v2-no-data", 400, "has neither 'data' nor parameters.binary_data_size", inputs({**tensor(), "data": None})),
    infer("v2-id-not-string", 400, "'id' must be a string", inputs(tensor(), id=7)),
    infer("v2-unknown-output", 400, "unknown output 'logits'", inputs(tensor(), outputs=[{"name": "logits"}])),
    infer("v2-invalid-json", 400, "request is not valid JSON", raw(b'{"inputs": [}')),
    infer("v2-json-not-object", 400, "must be a JSON object", [tensor()]),
    infer("v2-binary-header-too-long", 400, "Content-Length 100000 does not fit", binary_infer(bytes(256), 100_000)),
    infer("v2-binary-header-not-int", 400, "must be an integer, got 'ten'", binary_infer(bytes(256), "ten")),
    infer("v2-binary-size-mismatch", 400, "needs 256 bytes; binary_data_size is 256 and 200", binary_infer(bytes(200))),
    infer("v2-binary-size-a-string", 400, "binary_data_size must be an integer", binary_infer(bytes(256), None, "256")),
    infer("v2-unknown-model", 404, "unknown model 'no-such-model'", inputs(tensor()), "/v2/models/no-such-model/infer"),
    infer("v2-unknown-version", 404, "version '7' is not served; v1 is", inputs(tensor()), f"{VERSION_7}/infer"),
    Case("v2-unknown-version-metadata", "GET", VERSION_7, 404, "version '7' is not served; v1 is"),
    Case("v2-unknown-model-ready", "GET", "/v2/models/nope/ready", 404, "unknown model 'nope'"),
    infer("v2-deeply-nested-json", 400, "request is not valid JSON: nested too deeply", raw(DEEP)),
    infer("v2-integer-too-big-for-float", 400, UINT8, raw(HUGE_INT)),
    # --- /feedback
    feedback(
        "feedback-unknown-request-id", 404, "no prediction with request_id 'nope'", {"request_id": "nope", "label": 1}
    ),
    feedback("feedback-unknown-label", 422, "unknown label 'ten'; model v1 knows: 0, 1, 2", {**RID, "label": "ten"}),
    feedback("feedback-index-out-of-range", 422, "label index 10 is out of range for 10 classes", {**RID, "label": 10}),
    feedback("feedback-index-negative", 422, "label index -1 is out of range", {**RID, "label": -1}),
    feedback("feedback-missing-fields", 422, "body.request_id: Field required", {}),
    feedback("feedback-missing-label", 422, "body.label: Field required", RID),
    feedback("feedback-invalid-json", 422, "JSON decode error", raw(b"{oops")),
    feedback("feedback-body-over-limit", 413, OVER, {"request_id": "x" * 60_000, "label": 1}),
    feedback("feedback-body-over-limit-chunked", 413, OVER, raw(b""), chunked=60_000),
    feedback("feedback-label-boolean", 422, "body.label", {**RID, "label": True}),
    # --- admin, routing
    Case("reload-without-token", "POST", "/admin/reload", 401, "needs 'Authorization: Bearer <serve.admin_token>'"),
    Case("reload-wrong-token", "POST", "/admin/reload", 401, "needs 'Authorization: Bearer", bearer("nope")),
    Case("reload-with-token", "POST", "/admin/reload", 200, '"result":"unchanged"', bearer(TOKEN)),
    Case("unknown-route", "GET", "/predictions", 404, "Not Found"),
    Case("wrong-method", "GET", "/predict", 405, "Method Not Allowed"),
    Case("wrong-method-v2", "DELETE", "/v2/models/{model}/infer", 405, "Method Not Allowed"),
]


def fill(value: Any, request_id: str) -> Any:
    if value == "{request_id}":
        return request_id
    if isinstance(value, dict):
        return {k: fill(v, request_id) for k, v in value.items()}
    return value


def send(http: httpx.Client, case: Case, model: str, request_id: str) -> httpx.Response:
    kwargs = fill(case.kwargs, request_id)
    if case.chunked:
        # a generator body has no Content-Length: httpx sends it with Transfer-Encoding: chunked
        kwargs["content"] = (bytes(4096) for _ in range(case.chunked // 4096 + 1))
    return http.request(case.method, case.path.replace("{model}", model), **kwargs)


SENT: list[str] = []


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=f"BUG: {c.bug}")] if c.bug else [])
        for c in CASES
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem(strict_server, champion_settings, request_id, case):
    SENT.append(case.name)
    with strict_server.client() as http:
        response = send(http, case, champion_settings.registry.model_name, request_id)
    assert response.status_code == case.status, response.text
    if response.is_success:
        assert case.says in response.text.replace(" ", "")
        return
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert case.says in body["error"]


def test_corpus_has_the_promised_variety():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


def test_server_is_healthy_after_the_corpus_and_counted_it(strict_server, champion_settings, request_id):
    with strict_server.client() as http:  # when run on its own (or with -k), send what the corpus test did not
        for case in CASES:
            if case.name not in SENT:
                send(http, case, champion_settings.registry.model_name, request_id)
    with strict_server.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert http.post("/predict", files={"file": ("ok.png", GREY_PNG)}).status_code == 200
        metrics = http.get("/metrics").text
    counted = {
        reason: float(value)
        for reason, value in re.findall(r'^visionloop_bad_requests_total\{reason="([^"]+)"\} (\S+)$', metrics, re.M)
    }
    expected = {
        "not_an_image", "empty", "damaged_image", "too_many_pixels", "image_mode", "too_many_images",
        "body_too_large", "bad_base64", "bad_json", "no_images", "content_type", "invalid_request",
        "v2_request", "v2_input_name", "v2_datatype", "v2_shape", "v2_output_name", "v2_model",
        "unknown_request_id", "unknown_label", "unauthorized", "http_404", "http_405",
    }  # fmt: skip
    assert expected <= set(counted), sorted(expected - set(counted))
    assert counted["too_many_pixels"] >= 5 and counted["image_mode"] >= 5
