"""For operators: liveness, readiness, Prometheus metrics, and the reload button."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.schemas import ErrorBody

router = APIRouter()


@router.get("/healthz", tags=["health"], summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", tags=["health"], summary="Readiness: a model is loaded and warmed up", responses={503: {}})
async def readyz(service: ServiceDep) -> JSONResponse:
    model = service.holder.current
    body = {
        "ready": model is not None,
        "model": None if model is None else {"name": model.name, "version": model.version},
        "status": service.holder.status,
    }
    return JSONResponse(body, status_code=200 if model is not None else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/admin/reload",
    tags=["admin"],
    summary="Check the registry now and switch to a new champion",
    responses={401: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def admin_reload(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Resolves `serve.model_ref` in the registry; loads, checks and swaps in a new version. A version
    that fails its check is refused and the current model keeps serving. Needs
    `Authorization: Bearer <serve.admin_token>` when a token is set."""
    token = service.settings.serve.admin_token
    if token and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        raise ApiError(401, "POST /admin/reload needs 'Authorization: Bearer <serve.admin_token>'", "unauthorized")
    result = await service.holder.reload(force=True)
    if result.result in ("failed", "no_model"):
        return JSONResponse({"error": result.message, **result.to_dict()}, status_code=409)
    return JSONResponse(result.to_dict())
