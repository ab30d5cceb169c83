"""The KServe V2 protocol codec: JSON and binary request framing, response framing, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visionloop.serving.errors import ApiError
from visionloop.serving.v2 import HEADER_LENGTH, InferRequest, encode_infer, model_metadata, parse_infer

SHAPE = (3, 2, 2)  # the model's (C, H, W)
MAX_IMAGES = 4
PIXELS = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, *SHAPE) * 10  # N=2, values 0..230


def spec(**overrides) -> dict:
    entry = {"name": "input", "datatype": "UINT8", "shape": [2, *SHAPE], "data": PIXELS.reshape(-1).tolist()}
    entry.update(overrides)
    return {key: value for key, value in entry.items() if value is not None}


def json_body(*inputs: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs) or [spec()], **extra}).encode()


def binary_body(header: dict, blob: bytes) -> tuple[bytes, str]:
    """A body in Triton's binary framing and the Inference-Header-Content-Length that goes with it."""
    head = json.dumps(header).encode()
    return head + blob, str(len(head))


def binary_request(blob: bytes = PIXELS.tobytes(), size: int | None = None, **extra) -> tuple[bytes, str]:
    declared = len(blob) if size is None else size
    return binary_body({"inputs": [spec(data=None, parameters={"binary_data_size": declared})], **extra}, blob)


def parse(body: bytes, header_length: str | None = None) -> InferRequest:
    return parse_infer(body, header_length, SHAPE, MAX_IMAGES)


# ----------------------------------------------------------------------------------- decoding requests
def test_flat_nested_and_binary_inputs_decode_to_the_same_pixels():
    flat = parse(json_body())
    nested = parse(json_body(spec(data=PIXELS.tolist())))
    binary = parse(*binary_request())
    for request in (flat, nested, binary):
        assert request.pixels.dtype == np.uint8
        assert request.pixels.shape == (2, *SHAPE)
        np.testing.assert_array_equal(request.pixels, PIXELS)


def test_boundary_values_0_and_255_are_accepted():
    data = [0, 255] * 6  # one image of 12 values
    request = parse(json_body(spec(shape=[1, *SHAPE], data=data)))
    assert request.pixels.reshape(-1).tolist() == data


def test_header_length_with_json_data_and_no_binary_part():
    body = json_body()
    request = parse(body, str(len(body)))
    np.testing.assert_array_equal(request.pixels, PIXELS)


def test_request_id_is_kept_and_every_output_is_json_by_default():
    request = parse(json_body(id="req-7"))
    assert request.id == "req-7"
    assert request.outputs == {"probabilities": False, "embedding": False}
    assert parse(json_body()).id is None


def test_binary_data_output_makes_every_output_binary():
    request = parse(json_body(parameters={"binary_data_output": True}))
    assert request.outputs == {"probabilities": True, "embedding": True}


def test_per_output_binary_data_overrides_the_request_default():
    outputs = [{"name": "embedding"}, {"name": "probabilities", "parameters": {"binary_data": False}}]
    request = parse(json_body(parameters={"binary_data_output": True}, outputs=outputs))
    assert request.outputs == {"embedding": True, "probabilities": False}
    assert list(request.outputs) == ["embedding", "probabilities"]  # request order, which the response keeps


def test_outputs_list_selects_outputs_and_binary_data_per_output():
    request = parse(json_body(outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]))
    assert request.outputs == {"probabilities": True}


def test_binary_framing_also_reads_outputs_and_id():
    body, length = binary_request(id="bin-1", outputs=[{"name": "embedding", "parameters": {"binary_data": True}}])
    request = parse(body, length)
    assert (request.id, request.outputs) == ("bin-1", {"embedding": True})


# ----------------------------------------------------------------------------------- encoding responses
PROBS = np.array([[0.25, 0.75], [0.9, 0.1]], dtype=np.float32)
EMBEDDINGS = np.array([[1.5, -2.0, 3.25], [0.0, 4.0, -0.5]], dtype=np.float64)  # cast to FP32 on the way out
RESULTS = {"probabilities": PROBS, "embedding": EMBEDDINGS}


def split_response(body: bytes, headers: dict[str, str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a response by hand: JSON header, then each binary output's bytes in order."""
    n = int(headers[HEADER_LENGTH])
    header, rest = json.loads(body[:n]), body[n:]
    arrays = {}
    for output in header["outputs"]:
        if "data" in output:
            arrays[output["name"]] = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        else:
            size = output["parameters"]["binary_data_size"]
            arrays[output["name"]] = np.frombuffer(rest[:size], dtype="<f4").reshape(output["shape"])
            rest = rest[size:]
    assert rest == b""  # nothing left over
    return header, arrays


def test_json_response():
    request = parse(json_body(id="abc"))
    body, headers = encode_infer("digits", "3", request, RESULTS, {"request_ids": ["x", "y"]})
    assert headers == {"content-type": "application/json"}
    response = json.loads(body)
    assert response["model_name"] == "digits"
    assert response["model_version"] == "3"
    assert response["id"] == "abc"
    assert response["parameters"] == {"request_ids": ["x", "y"]}
    outputs = {o["name"]: o for o in response["outputs"]}
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "embedding"]
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["shape"] == [2, 2]
    assert outputs["embedding"]["shape"] == [2, 3]
    np.testing.assert_allclose(outputs["probabilities"]["data"], PROBS.reshape(-1))
    np.testing.assert_allclose(outputs["embedding"]["data"], EMBEDDINGS.reshape(-1))


def test_response_without_id_or_parameters_leaves_them_out():
    body, _ = encode_infer("digits", "3", parse(json_body()), RESULTS, {})
    response = json.loads(body)
    assert "id" not in response
    assert "parameters" not in response


def test_binary_response_reparsed_by_hand():
    request = parse(json_body(parameters={"binary_data_output": True}))
    body, headers = encode_infer("digits", "3", request, RESULTS, {})
    assert headers["content-type"] == "application/octet-stream"
    header, arrays = split_response(body, headers)
    assert all("data" not in o for o in header["outputs"])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [2 * 2 * 4, 2 * 3 * 4]
    np.testing.assert_array_equal(arrays["probabilities"], PROBS)
    np.testing.assert_array_equal(arrays["embedding"], EMBEDDINGS.astype(np.float32))


def test_mixed_response_puts_only_binary_outputs_after_the_header_in_request_order():
    outputs = [{"name": "embedding", "parameters": {"binary_data": True}}, {"name": "probabilities"}]
    request = parse(json_body(outputs=outputs))
    body, headers = encode_infer("digits", "3", request, RESULTS, {})
    n = int(headers[HEADER_LENGTH])
    assert len(body) - n == 2 * 3 * 4  # only the embedding follows the header
    header, arrays = split_response(body, headers)
    assert [o["name"] for o in header["outputs"]] == ["embedding", "probabilities"]
    assert "data" in header["outputs"][1]
    np.testing.assert_array_equal(arrays["embedding"], EMBEDDINGS.astype(np.float32))
    np.testing.assert_allclose(arrays["probabilities"], PROBS)


def test_only_requested_outputs_are_sent():
    request = parse(json_body(outputs=[{"name": "probabilities"}]))
    body, _ = encode_infer("digits", "3", request, RESULTS, {})
    assert [o["name"] for o in json.loads(body)["outputs"]] == ["probabilities"]


def test_model_metadata():
    card = {"channels": 1, "image_size": 28, "classes": ["0", "1", "2"], "dataset": {"version": "ds-abc"}}
    meta = model_metadata("digits", "5", card, embedding_dim=64)
    assert meta["name"] == "digits"
    assert meta["versions"] == ["5"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]},
    ]
    assert meta["parameters"] == {"classes": ["0", "1", "2"], "dataset_version": "ds-abc"}
    assert model_metadata("digits", "5", {**card, "dataset": {}}, 64)["parameters"]["dataset_version"] is None


# ----------------------------------------------------------------------------------- refusals
def data_with(value: object) -> list:
    data: list = PIXELS.reshape(-1).tolist()
    data[5] = value
    return data


BAD_JSON_REQUESTS = {
    "wrong input name": (json_body(spec(name="pixels")), r"exactly one input named 'input'.*\['pixels'\]"),
    "two inputs": (json_body(spec(), spec()), r"exactly one input named 'input'"),
    "input not an object": (json_body("input"), r"exactly one input named 'input'"),
    "empty inputs": (json.dumps({"inputs": []}).encode(), r"non-empty 'inputs' list"),
    "no inputs": (json.dumps({"id": "x"}).encode(), r"non-empty 'inputs' list"),
    "datatype FP32": (json_body(spec(datatype="FP32")), r"datatype UINT8.*'FP32'"),
    "datatype missing": (json_body(spec(datatype=None)), r"datatype UINT8.*None"),
    "wrong channels": (json_body(spec(shape=[2, 1, 2, 2])), r"shape \[-1, 3, 2, 2\] with N >= 1; got \[2, 1, 2, 2\]"),
    "shape of three": (json_body(spec(shape=[3, 2, 2])), r"shape \[-1, 3, 2, 2\]"),
    "shape not a list": (json_body(spec(shape="2x3x2x2")), r"shape \[-1, 3, 2, 2\]"),
    "float dimension": (json_body(spec(shape=[2.0, 3, 2, 2])), r"shape \[-1, 3, 2, 2\]"),
    "N zero": (json_body(spec(shape=[0, *SHAPE], data=[])), r"N >= 1; got \[0, 3, 2, 2\]"),
    "N negative": (json_body(spec(shape=[-1, *SHAPE])), r"N >= 1"),
    "too few values": (json_body(spec(data=PIXELS.reshape(-1).tolist()[:-1])), r"needs 24 values; data has 23"),
    "too many values": (json_body(spec(data=[*PIXELS.reshape(-1).tolist(), 1])), r"needs 24 values; data has 25"),
    "256": (json_body(spec(data=data_with(256))), r"integer from 0 to 255"),
    "-1": (json_body(spec(data=data_with(-1))), r"integer from 0 to 255"),
    "1.5": (json_body(spec(data=data_with(1.5))), r"integer from 0 to 255"),
    "NaN": (json_body(spec(data=data_with(float("nan")))), r"integer from 0 to 255"),
    "Infinity": (json_body(spec(data=data_with(float("inf")))), r"integer from 0 to 255"),
    "null value": (json_body(spec(data=data_with(None))), r"\(nested\) list of numbers"),
    "object value": (json_body(spec(data=data_with({"v": 1}))), r"\(nested\) list of numbers"),
    "ragged lists": (json_body(spec(data=[[1, 2], [3]])), r"needs 24 values; data has 3"),
    "no data": (json_body(spec(data=None)), r"neither 'data' nor parameters.binary_data_size"),
    "binary size without header": (json_body(spec(parameters={"binary_data_size": 24})), r"no Inference-Header"),
    "input parameters not an object": (json_body(spec(parameters=[1])), r"input 'parameters' must be an object"),
    "unknown output": (json_body(outputs=[{"name": "logits"}]), r"unknown output 'logits'.*probabilities"),
    "output without name": (json_body(outputs=[{}]), r"unknown output None"),
    "outputs not a list": (json_body(outputs={"name": "embedding"}), r"'outputs' must be a list"),
    "output parameters": (json_body(outputs=[{"name": "embedding", "parameters": 1}]), r"'parameters' must be an"),
    "request parameters": (json_body(parameters="binary"), r"request 'parameters' must be an object"),
    "numeric id": (json_body(id=7), r"'id' must be a string"),
    "non-object JSON": (b"[1, 2, 3]", r"must be a JSON object"),
    "JSON string": (b'"input"', r"must be a JSON object"),
    "invalid JSON": (b'{"inputs": [', r"not valid JSON"),
    "empty body": (b"", r"not valid JSON"),
    "not UTF-8": (b"\xff\xfe\xfa{}", r"not valid JSON"),
}


@pytest.mark.parametrize("body, message", BAD_JSON_REQUESTS.values(), ids=BAD_JSON_REQUESTS.keys())
def test_bad_json_request_is_a_400_naming_the_problem(body, message):
    with pytest.raises(ApiError, match=message) as caught:
        parse(body)
    assert caught.value.status == 400
    assert caught.value.message == str(caught.value)


def test_refusal_reasons_label_the_metric():
    cases = {
        "v2_input_name": json_body(spec(name="x")),
        "v2_datatype": json_body(spec(datatype="INT8")),
        "v2_shape": json_body(spec(shape=[2, 3, 4, 4])),
        "v2_output_name": json_body(outputs=[{"name": "x"}]),
        "v2_request": b"nope",
    }
    for reason, body in cases.items():
        with pytest.raises(ApiError) as caught:
            parse(body)
        assert caught.value.reason == reason
    with pytest.raises(ApiError) as caught:
        parse(json_body(spec(data=data_with(300))))
    assert caught.value.reason == "v2_datatype"
    with pytest.raises(ApiError) as caught:
        parse(json_body(spec(data=[1])))
    assert caught.value.reason == "v2_shape"


def bad_binary_requests() -> dict[str, tuple[bytes, str, str]]:
    body, length = binary_request()
    json_only = json_body()
    return {
        "header length not an integer": (body, "twelve", r"must be an integer, got 'twelve'"),
        "header length a float": (body, "12.0", r"must be an integer, got '12.0'"),
        "header length zero": (body, "0", r"Inference-Header-Content-Length 0 does not fit a body of"),
        "header length negative": (body, "-4", r"-4 does not fit"),
        "header length beyond the body": (body, str(len(body) + 1), rf"{len(body) + 1} does not fit a body of"),
        "header length cuts the JSON": (body, str(int(length) - 3), r"not valid JSON"),
        "declared size under the bytes sent": (*binary_request(size=23), r"needs 24 bytes; binary_data_size is 23"),
        "declared size over the bytes sent": (*binary_request(size=25), r"binary_data_size is 25 and 24 bytes"),
        "fewer bytes than the shape needs": (*binary_request(PIXELS.tobytes()[:-1]), r"needs 24 bytes.*23 bytes"),
        "more bytes than the shape needs": (*binary_request(PIXELS.tobytes() + b"\0"), r"needs 24 bytes.*25 bytes"),
        "binary data without declaration": (json_only + b"\x01\x02", str(len(json_only)), r"no input declares"),
    }


@pytest.mark.parametrize("name", list(bad_binary_requests()))
def test_bad_binary_request_is_a_400_naming_the_problem(name):
    body, length, message = bad_binary_requests()[name]
    with pytest.raises(ApiError, match=message) as caught:
        parse(body, length)
    assert caught.value.status == 400


def test_more_images_than_max_images_is_a_413():
    five = np.zeros((5, *SHAPE), dtype=np.uint8)
    json_request = json_body(spec(shape=[5, *SHAPE], data=five.reshape(-1).tolist()))
    binary_request_ = binary_body(
        {"inputs": [spec(shape=[5, *SHAPE], data=None, parameters={"binary_data_size": five.size})]}, five.tobytes()
    )
    for body, length in ((json_request, None), binary_request_):
        with pytest.raises(ApiError, match=r"5 images in one request; the limit is 4") as caught:
            parse(body, length)
        assert (caught.value.status, caught.value.reason) == (413, "too_many_images")
    at_limit = np.zeros((MAX_IMAGES, *SHAPE), dtype=np.uint8)
    assert parse(json_body(spec(shape=[4, *SHAPE], data=at_limit.tolist()))).pixels.shape == (4, *SHAPE)


def test_huge_integer_value_is_a_400():
    data = ", ".join(["1"] * 23 + [str(10**400)])
    body = b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, 3, 2, 2], "data": [%s]}]}' % data.encode()
    with pytest.raises(ApiError, match=r"integer from 0 to 255") as caught:
        parse(body)
    assert caught.value.status == 400


@pytest.mark.parametrize("value", ["7", True], ids=["string", "bool"])
def test_non_number_values_are_a_400(value):
    with pytest.raises(ApiError) as caught:
        parse(json_body(spec(data=data_with(value))))
    assert caught.value.status == 400
