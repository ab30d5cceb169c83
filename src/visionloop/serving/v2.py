"""The KServe V2 Open Inference Protocol (REST), with Triton's binary tensor data extension.

A request body is either JSON, or — with the ``Inference-Header-Content-Length`` header — a JSON
header followed by raw tensor bytes, each input's share given by ``parameters.binary_data_size``.
Outputs go back as JSON ``data``, or as raw bytes after the JSON header when the client asks for
``binary_data`` (per output) or ``binary_data_output`` (per request; tritonclient's default).
Errors are ``{"error": "..."}`` with a 4xx status, which is what V2 clients read.

Our model takes one input, ``input``: UINT8 pixels, shape [N, C, H, W] as in the model card, and
answers ``probabilities`` (FP32 [N, classes]) and ``embedding`` (FP32 [N, D]).

What parsing costs is bounded before it starts: a JSON part longer than the largest valid request for
this model could be (``max_json_bytes``) is refused with 413 unparsed, and the route parses large bodies
in a worker process, since ``json.loads`` holds the GIL for its whole run.
JSON that Python cannot parse — NaN/Infinity literals, an integer of more than 4,300 digits (Python's
int-string limit), bad UTF-8, nesting too deep — is a 400 naming the problem, never a 500.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionloop.inference import INPUT_NAME, OUTPUT_NAMES
from visionloop.serving.errors import ApiError

HEADER_LENGTH = "inference-header-content-length"
# V2 datatypes and their numpy equivalents (BYTES is not a fixed-width tensor: not taken here)
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
# JSON bytes one UINT8 value can take in a valid request: "255, " is 5; pretty-printed nesting adds a newline
# and indentation per value. Generous on purpose: the cap is there to refuse 16 MB for a 64-value model.
JSON_BYTES_PER_VALUE = 16
JSON_SLACK_BYTES = 64 * 1024  # id, parameters, outputs, names


@dataclass
class InferRequest:
    id: str | None
    pixels: np.ndarray  # uint8 (N, C, H, W)
    outputs: dict[str, bool]  # requested output -> send as binary


def _bad(message: str, reason: str = "v2_request") -> ApiError:
    return ApiError(400, message, reason)


def max_json_bytes(input_shape: tuple[int, int, int], max_images: int) -> int:
    """The longest JSON part a valid request for ``input_shape`` can have (every value as JSON text)."""
    return max_images * int(np.prod(input_shape)) * JSON_BYTES_PER_VALUE + JSON_SLACK_BYTES


def max_body_bytes(input_shape: tuple[int, int, int], max_images: int, binary: bool) -> int:
    """The longest body a valid request can have: its JSON, plus the raw pixels in binary framing. A longer
    Content-Length is refused before a byte of the body is read."""
    pixels = max_images * int(np.prod(input_shape)) if binary else 0
    return max_json_bytes(input_shape, max_images) + pixels


def json_length(body: bytes, header_length: str | None) -> int:
    """Bytes of JSON in ``body`` (all of it, or the header the client declares), for the size checks."""
    if header_length is None:
        return len(body)
    try:
        return min(max(int(header_length), 0), len(body))
    except ValueError:
        return len(body)  # _split says what is wrong with the header


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(f"non-finite number {name} (JSON has no NaN or Infinity; a pixel is an integer from 0 to 255)")


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise _bad(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    try:
        header = json.loads(json_part, parse_constant=_refuse_constant)
    except _NonFinite as exc:
        raise _bad(f"request is not valid JSON: {exc}", "non_finite") from None
    except RecursionError:
        raise _bad("request is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, and an integer past Python's int-string limit
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            raise _bad(f"request is not valid JSON: an integer literal has more than {limit:,} digits") from None
        raise _bad(f"request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad("request must be a JSON object with an 'inputs' list")
    return header, binary


def parse_infer(
    body: bytes, header_length: str | None, input_shape: tuple[int, int, int], max_images: int
) -> InferRequest:
    """Decode and check an infer request for a model taking UINT8 ``input`` of ``[N, *input_shape]``."""
    limit = max_json_bytes(input_shape, max_images)
    if json_length(body, header_length) > limit:
        raise ApiError(
            413,
            f"the JSON part of this request is {json_length(body, header_length):,} bytes; a request for input "
            f"{[-1, *input_shape]} with at most {max_images} images needs at most {limit:,} (send pixels as "
            "binary data, Inference-Header-Content-Length, or fewer images)",
            "body_too_large",
        )
    header, binary = _split(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("request needs a non-empty 'inputs' list")
    names = [i.get("name") if isinstance(i, dict) else None for i in inputs]
    if names != [INPUT_NAME]:
        raise _bad(f"the model takes exactly one input named {INPUT_NAME!r}; got {names}", "v2_input_name")
    spec = inputs[0]
    datatype = spec.get("datatype")
    if datatype != "UINT8":
        raise _bad(f"input {INPUT_NAME!r} must have datatype UINT8 (pixels 0-255); got {datatype!r}", "v2_datatype")
    shape = spec.get("shape")
    expected = [-1, *input_shape]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1:] != list(input_shape)
        or shape[0] < 1
    ):
        raise _bad(f"input {INPUT_NAME!r} must have shape {expected} with N >= 1; got {shape}", "v2_shape")
    if shape[0] > max_images:
        raise ApiError(413, f"{shape[0]} images in one request; the limit is {max_images}", "too_many_images")
    count = int(np.prod(shape))
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("input 'parameters' must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool):
            raise _bad(f"binary_data_size must be an integer number of bytes, got {size!r}")
        if header_length is None:
            raise _bad("binary_data_size given but no Inference-Header-Content-Length header")
        if size != len(binary) or size != count:
            raise _bad(
                f"input {INPUT_NAME!r} of shape {shape} needs {count} bytes; "
                f"binary_data_size is {size} and {len(binary)} bytes follow the header",
                "v2_shape",
            )
        pixels = np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    else:
        if binary:
            raise _bad("binary data follows the header but no input declares binary_data_size")
        pixels = _json_pixels(spec.get("data"), shape, count)
    return InferRequest(_request_id(header), pixels, _requested_outputs(header))


def _json_pixels(data: Any, shape: list[int], count: int) -> np.ndarray:
    if data is None:
        raise _bad(f"input {INPUT_NAME!r} has neither 'data' nor parameters.binary_data_size")
    values = _leaves(data) if isinstance(data, list) else None
    if values is None:
        raise _bad(f"input {INPUT_NAME!r} data must be a (nested) list of numbers", "v2_datatype")
    out_of_range = _bad(f"input {INPUT_NAME!r} is UINT8: every value must be an integer from 0 to 255", "v2_datatype")
    try:
        flat = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        raise out_of_range from None
    if flat.size != count:
        raise _bad(f"input {INPUT_NAME!r} of shape {shape} needs {count} values; data has {flat.size}", "v2_shape")
    if flat.size and (flat.min() < 0 or flat.max() > 255 or not np.all(flat == np.floor(flat))):
        raise out_of_range
    return flat.astype(np.uint8).reshape(shape)


def _leaves(data: list) -> list[int | float] | None:
    """The numbers of a nested list, in order; None when a leaf is not a number (bools are not)."""
    out: list[int | float] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if isinstance(item, bool) or not isinstance(item, int | float):
                return None
            out.append(item)
        else:
            stack.pop()
    return out


def _request_id(header: dict) -> str | None:
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad("request 'id' must be a string")
    return rid


def _requested_outputs(header: dict) -> dict[str, bool]:
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("request 'parameters' must be an object")
    default_binary = bool(params.get("binary_data_output", False))
    outputs = header.get("outputs")
    if outputs is None:
        return dict.fromkeys(OUTPUT_NAMES, default_binary)
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a list")
    wanted: dict[str, bool] = {}
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in OUTPUT_NAMES:
            raise _bad(f"unknown output {name!r}; the model has {list(OUTPUT_NAMES)}", "v2_output_name")
        out_params = out.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise _bad(f"output {name!r} 'parameters' must be an object")
        wanted[name] = bool(out_params.get("binary_data", default_binary))
    return wanted


def encode_infer(
    model_name: str, version: str, request: InferRequest, results: dict[str, np.ndarray], parameters: dict
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; binary outputs follow the JSON header in request order."""
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        array = np.ascontiguousarray(results[name], dtype=np.float32)
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = array.astype("<f4", copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def model_metadata(model_name: str, version: str, card: dict, embedding_dim: int) -> dict:
    c, s = card["channels"], card["image_size"]
    return {
        "name": model_name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, c, s, s]}],
        "outputs": [
            {"name": OUTPUT_NAMES[0], "datatype": "FP32", "shape": [-1, len(card["classes"])]},
            {"name": OUTPUT_NAMES[1], "datatype": "FP32", "shape": [-1, embedding_dim]},
        ],
        "parameters": {"classes": card["classes"], "dataset_version": card.get("dataset", {}).get("version")},
    }
