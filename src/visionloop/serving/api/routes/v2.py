"""The KServe V2 Open Inference Protocol (REST): server and model metadata, health, infer.

The wire format (JSON and binary tensors) is the codec's, ``visionloop.serving.v2``; this module only
routes. The input is the model's own tensor, so nothing is converted or resized on this path.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from visionloop import __version__
from visionloop.serving import v2 as codec
from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.model import LoadedModel
from visionloop.serving.schemas import ERRORS
from visionloop.serving.service import Service

V2_BODY = {
    "requestBody": {
        "required": True,
        "description": "V2 inference request (JSON), or a JSON header plus binary tensors "
        "(Inference-Header-Content-Length).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array", "items": {}},
                                },
                                "required": ["name", "shape", "datatype"],
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                        "parameters": {"type": "object"},
                    },
                    "required": ["inputs"],
                }
            }
        },
    }
}

router = APIRouter(tags=["v2"])


def served_model(service: Service, name: str, version: str | None) -> LoadedModel:
    """The loaded model, if ``name`` (and ``version``, when given) is the one this server serves; else 404."""
    served = service.settings.registry.model_name
    if name != served:
        raise ApiError(404, f"unknown model {name!r}; this server serves {served!r}", "v2_model")
    model = service.model()
    if version not in (None, "", model.version):
        raise ApiError(404, f"model {name!r} version {version!r} is not served; v{model.version} is", "v2_model")
    return model


@router.get("/v2", summary="Server metadata")
async def v2_server() -> dict:
    return {"name": "visionloop", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def v2_live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready", responses={503: {}})
async def v2_ready(service: ServiceDep) -> JSONResponse:
    ready = service.holder.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/v2/models/{name}", responses=ERRORS)
@router.get("/v2/models/{name}/versions/{version}", responses=ERRORS)
async def v2_metadata(name: str, service: ServiceDep, version: str | None = None) -> dict:
    model = served_model(service, name, version)
    dim = int(model.card["outputs"]["embedding"]["shape"][1])
    return codec.model_metadata(model.name, model.version, model.card, dim)


@router.get("/v2/models/{name}/ready", responses=ERRORS)
@router.get("/v2/models/{name}/versions/{version}/ready", responses=ERRORS)
async def v2_model_ready(name: str, service: ServiceDep, version: str | None = None) -> dict:
    model = served_model(service, name, version)
    return {"name": model.name, "ready": True}


@router.post("/v2/models/{name}/infer", responses=ERRORS, openapi_extra=V2_BODY)
@router.post("/v2/models/{name}/versions/{version}/infer", responses=ERRORS, openapi_extra=V2_BODY)
async def v2_infer(name: str, request: Request, service: ServiceDep, version: str | None = None) -> Response:
    """Infer with the V2 protocol: `input` UINT8 [N, C, H, W] → `probabilities`, `embedding` (FP32).
    Binary tensors (Inference-Header-Content-Length) and JSON data are both accepted. A full queue answers
    503 with `Retry-After`."""
    model = served_model(service, name, version)
    with service.batcher.arriving():
        parsed = await _parse(service, model, request)
    probs, embeddings = await service.classify(model, parsed.pixels)
    side = model.image_size
    ids = service.record(
        model, "v2", parsed.pixels, probs, embeddings, [(side, side)] * len(probs), [None] * len(probs)
    )
    content, headers = codec.encode_infer(
        model.name, model.version, parsed, {"probabilities": probs, "embedding": embeddings}, {"request_ids": ids}
    )
    return Response(content, headers=headers)


async def _parse(service: Service, model: LoadedModel, request: Request) -> codec.InferRequest:
    """Parse inline when the JSON part is small; else in the bounded parse worker process, where json.loads
    (which holds the GIL for its whole run: seconds for 16 MB) cannot stop the event loop."""
    serve = service.settings.serve
    header_length = request.headers.get(codec.HEADER_LENGTH)
    shape = (model.channels, model.image_size, model.image_size)
    declared = request.headers.get("content-length", "")
    limit = codec.max_body_bytes(shape, serve.max_images, header_length is not None)
    if declared.isdigit() and int(declared) > limit:  # refused before the body is read: 16 MB costs nothing
        raise ApiError(
            413,
            f"request body of {int(declared):,} bytes is longer than any valid request for input "
            f"{[-1, *shape]} with at most {serve.max_images} images ({limit:,} bytes)",
            "body_too_large",
        )
    body = await request.body()
    size = codec.json_length(body, header_length)
    if size <= serve.parse_inline_kb * 1024 or size > codec.max_json_bytes(shape, serve.max_images):
        return codec.parse_infer(body, header_length, shape, serve.max_images)  # small, or refused unparsed
    return await service.parse_pool.run(len(body), codec.parse_infer, body, header_length, shape, serve.max_images)
