"""V2 JSON that Python cannot turn into pixels is a 400 naming the problem, and parsing is bounded before it starts."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from PIL import Image

from visionloop.data.transform import InputTransform
from visionloop.serving.errors import ApiError
from visionloop.serving.images import decode
from visionloop.serving.v2 import InferRequest, max_body_bytes, max_json_bytes, parse_infer

SHAPE = (1, 2, 2)
MAX_IMAGES = 2


def body_with(data_text: str, n: int = 1) -> bytes:
    return f'{{"inputs":[{{"name":"input","datatype":"UINT8","shape":[{n},1,2,2],"data":{data_text}}}]}}'.encode()


@pytest.mark.parametrize(
    ("data_text", "message"),
    [
        ("[" + "1" * 4301 + ",0,0,0]", "an integer literal has more than 4,300 digits"),
        ("[NaN,0,0,0]", "non-finite number NaN"),
        ("[Infinity,0,0,0]", "non-finite number Infinity"),
        ("[-Infinity,0,0,0]", "non-finite number -Infinity"),
    ],
)
def test_what_json_loads_cannot_take_is_a_400_naming_it(data_text: str, message: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_infer(body_with(data_text), None, SHAPE, MAX_IMAGES)
    assert refused.value.status == 400 and message in refused.value.message


def test_bad_utf8_is_a_400() -> None:
    with pytest.raises(ApiError, match="not valid JSON") as refused:
        parse_infer(b'{"inputs": "\xff\xfe"}', None, SHAPE, MAX_IMAGES)
    assert refused.value.status == 400


def test_a_json_part_longer_than_any_valid_request_is_refused_unparsed() -> None:
    limit = max_json_bytes(SHAPE, MAX_IMAGES)
    big = body_with("[" + "0," * limit + "0]")
    with pytest.raises(ApiError, match="needs at most") as refused:
        parse_infer(big, None, SHAPE, MAX_IMAGES)
    assert refused.value.status == 413
    pretty = json.dumps(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, *SHAPE], "data": [[[[255] * 2] * 2]] * 2}]},
        indent=8,
    ).encode()
    assert len(pretty) <= limit and len(parse_infer(pretty, None, SHAPE, MAX_IMAGES).pixels) == 2


def test_a_refusal_in_the_worker_process_comes_back_to_the_server_whole() -> None:
    with pytest.raises(ApiError) as refused:
        parse_infer(body_with("[NaN,0,0,0]"), None, SHAPE, MAX_IMAGES)
    copy = pickle.loads(pickle.dumps(refused.value))  # what concurrent.futures does across the process boundary
    assert (type(copy), copy.status, copy.message, copy.reason) == (ApiError, 400, refused.value.message, "non_finite")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(ApiError, match="non-finite number NaN") as remote:
            pool.submit(parse_infer, body_with("[NaN,0,0,0]"), None, SHAPE, MAX_IMAGES).result(timeout=60)
        parsed = pool.submit(parse_infer, body_with("[1,2,3,4]"), None, SHAPE, MAX_IMAGES).result(timeout=60)
    assert remote.value.status == 400 and remote.value.reason == "non_finite"
    assert isinstance(parsed, InferRequest) and parsed.pixels.reshape(-1).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_float_tiff_with_non_finite_pixels_is_a_422(bad: float) -> None:
    array = np.ones((6, 6), np.float32)
    array[0, 0] = bad
    buffer = io.BytesIO()
    Image.fromarray(array, "F").save(buffer, format="TIFF")
    with pytest.raises(ApiError, match=r"x\.tiff: non-finite pixel values") as refused:
        decode(buffer.getvalue(), InputTransform("L", 4), 1_000, True, "x.tiff")
    assert refused.value.status == 422 and refused.value.reason == "non_finite"


def test_the_body_limit_adds_the_raw_pixels_only_in_binary_framing() -> None:
    json_only = max_body_bytes(SHAPE, MAX_IMAGES, binary=False)
    assert json_only == max_json_bytes(SHAPE, MAX_IMAGES)
    assert max_body_bytes(SHAPE, MAX_IMAGES, binary=True) == json_only + MAX_IMAGES * 4
