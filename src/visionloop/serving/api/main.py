"""Every router of the API, in the order the OpenAPI schema lists them."""

from __future__ import annotations

from fastapi import APIRouter

from visionloop.serving.api.routes import feedback, monitoring, ops, predict, v2

api_router = APIRouter()
api_router.include_router(predict.router)
api_router.include_router(feedback.router)
api_router.include_router(ops.router)
api_router.include_router(v2.router)
api_router.include_router(monitoring.router)
