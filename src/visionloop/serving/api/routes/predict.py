"""POST /predict: images in (multipart or base64 JSON), top-k labels out, converted as training converted."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError, first_error
from visionloop.serving.images import DecodedImage, decode
from visionloop.serving.schemas import ERRORS, PredictJson, PredictResponse

DECODE_INLINE_BYTES = 256 * 1024  # smaller uploads decode on the event loop; larger ones in a thread

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
    `{"images": [base64, …]}`. Each image gets its top-k labels and a `request_id` for `/feedback`."""
    serve = service.settings.serve
    model = service.model()
    with service.batcher.arriving():
        uploads, top_k, convert = await _read_uploads(request, top_k, convert, serve.max_images)
        allow = serve.convert if convert is None else convert
        total = sum(len(data) for _, data in uploads)

        def decode_all() -> list[DecodedImage]:
            return [decode(data, model.transform, serve.max_pixels, allow, name) for name, data in uploads]

        images = decode_all() if total <= DECODE_INLINE_BYTES else await asyncio.to_thread(decode_all)
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


async def _read_uploads(
    request: Request, top_k: int | None, convert: bool | None, max_images: int
) -> tuple[list[tuple[str, bytes]], int | None, bool | None]:
    """(name, bytes) of every uploaded image, from multipart or JSON; top_k/convert in the JSON win over the query."""
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
        try:
            body = PredictJson.model_validate_json(await request.body())
        except ValueError as exc:
            raise ApiError(422, f"bad JSON body: {first_error(exc)}", "bad_json") from None
        if not body.images:
            raise ApiError(422, "'images' is empty; send at least one base64-encoded image", "no_images")
        if len(body.images) > max_images:
            raise ApiError(
                413, f"{len(body.images)} images in one request; the limit is {max_images}", "too_many_images"
            )
        for i, text in enumerate(body.images):
            payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
            try:
                uploads.append((f"images[{i}]", base64.b64decode(payload, validate=True)))
            except (binascii.Error, ValueError):
                raise ApiError(422, f"images[{i}] is not valid base64", "bad_base64") from None
        top_k = body.top_k or top_k
        convert = convert if body.convert is None else body.convert
    else:
        raise ApiError(
            415, f"send images as multipart/form-data or application/json, not {content_type or 'no content type'}",
            "content_type",
        )  # fmt: skip
    if len(uploads) > max_images:
        raise ApiError(413, f"{len(uploads)} images in one request; the limit is {max_images}", "too_many_images")
    return uploads, top_k, convert
