"""POST /predict: images in (multipart or base64 JSON), top-k labels out, converted as training converted."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionloop.data.transform import InputTransform
from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.images import (
    DecodedImage,
    decode_all,
    finish,
    open_upload,
    parse_predict_json,
)
from visionloop.serving.schemas import ERRORS, PredictJson, PredictResponse
from visionloop.serving.service import Service

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "application/json": {"schema": PredictJson.model_json_schema()},
        },
    }
}

router = APIRouter(tags=["predict"])


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify one or more images",
)
async def predict(
    request: Request,
    service: ServiceDep,
    top_k: Annotated[int | None, Query(ge=1, description="Labels per image.")] = None,
    convert: Annotated[
        bool | None,
        Query(
            description="Convert colour mode and size as training did, stated in `converted` (default: setting "
            "serve.convert); false refuses a mode other than the model's with 422."
        ),
    ] = None,
) -> Response:
    """Upload images as multipart files (any field name, e.g. `-F file=@cat.png`), or send JSON
    `{"images": [base64, …]}`. Each image gets its top-k labels and a `request_id` for `/feedback`.
    A full queue answers 503 with `Retry-After`."""
    serve = service.settings.serve
    model = service.model()
    with service.batcher.arriving():
        uploads, top_k, convert = await _read_uploads(request, service, top_k, convert)
        allow = serve.convert if convert is None else convert
        images = await _decode(service, model.transform, uploads, allow)
        pixels = np.stack([img.pixels for img in images])
    probs, embeddings = await service.classify(model, pixels)
    ids = service.record(
        model, "predict", pixels, probs, embeddings,
        [(img.width, img.height) for img in images], [img.converted for img in images],
        [data for _, data in uploads] if service.keep_images else None,
    )  # fmt: skip
    k = min(top_k or serve.top_k, len(model.classes))
    order = np.argsort(-probs, axis=1)[:, :k]
    predictions = [
        {
            "request_id": ids[i],
            "filename": uploads[i][0],
            "label": model.classes[order[i, 0]],
            "confidence": float(probs[i, order[i, 0]]),
            "top_k": [{"label": model.classes[j], "probability": float(probs[i, j])} for j in order[i]],
            "converted": images[i].converted,
        }
        for i in range(len(images))
    ]
    return JSONResponse({"model": {"name": model.name, "version": model.version}, "predictions": predictions})


async def _decode(
    service: Service, transform: InputTransform, uploads: list[tuple[str, bytes]], convert: bool
) -> list[DecodedImage]:
    """Decode where the cost says: headers on the loop (cheap, and what they show wrong is refused at once), then
    the pixels inline when the declared pixel count and the bytes are small, else in the bounded, lower-priority
    decode worker (503 + Retry-After when it is full).

    Upload bytes alone say little: a mostly-flat 4900x4900 PNG is 200 KB and a quarter of a second of CPU."""
    serve = service.settings.serve
    opened = [open_upload(data, transform, serve.max_pixels, convert, name) for name, data in uploads]
    pixels = sum(o.pixels for o in opened)
    small = pixels <= serve.decode_inline_pixels and sum(o.size_bytes for o in opened) <= serve.decode_inline_kb * 1024
    if small and not any(o.unbounded_per_pixel for o in opened):
        return [finish(o, transform) for o in opened]
    for o in opened:
        o.image.close()
    return await service.decode_pool.run(pixels, decode_all, uploads, transform, serve.max_pixels, convert)


async def _read_uploads(
    request: Request, service: Service, top_k: int | None, convert: bool | None
) -> tuple[list[tuple[str, bytes]], int | None, bool | None]:
    """(name, bytes) of every uploaded image, from multipart or JSON; top_k/convert in the JSON win over the query."""
    max_images = service.settings.serve.max_images
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[tuple[str, bytes]] = []
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images)
        except ApiError:
            raise
        except StarletteHTTPException as exc:  # python-multipart's limits and parse errors
            raise ApiError(413 if "Too many" in str(exc.detail) else 400, f"bad multipart body: {exc.detail}") from None
        except Exception as exc:
            raise ApiError(400, f"bad multipart body: {exc}") from None
        for key, value in form.multi_items():
            if isinstance(value, str):
                continue  # plain form fields are not images
            uploads.append((value.filename or key, await value.read()))
        await form.close()
        if not uploads:
            raise ApiError(
                422, "no files in the multipart body; send images as file fields (-F file=@image.png)", "no_images"
            )
    elif content_type == "application/json":
        raw = await request.body()
        if len(raw) <= service.settings.serve.parse_inline_kb * 1024:
            parsed = parse_predict_json(raw, max_images)
        else:  # pydantic's parse of 16 MB holds the GIL for a quarter of a second: not on the event loop
            parsed = await service.parse_pool.run(len(raw), parse_predict_json, raw, max_images)
        uploads, json_top_k, json_convert = parsed
        top_k = json_top_k or top_k
        convert = convert if json_convert is None else json_convert
    else:
        raise ApiError(
            415, f"send images as multipart/form-data or application/json, not {content_type or 'no content type'}",
            "content_type",
        )  # fmt: skip
    if len(uploads) > max_images:
        raise ApiError(413, f"{len(uploads)} images in one request; the limit is {max_images}", "too_many_images")
    return uploads, top_k, convert
