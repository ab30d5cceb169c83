"""GET /monitoring/drift: the latest drift check of the model this server serves, as the monitor stored it."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from visionloop.errors import VisionloopError
from visionloop.monitoring.schema import DriftResult
from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.schemas import ERRORS

router = APIRouter(tags=["monitoring"])


@router.get("/monitoring/drift", response_model=DriftResult, responses=ERRORS)
async def latest_drift(service: ServiceDep) -> DriftResult:
    """The newest result `visionloop monitor` (or `monitor check`) recorded in the shared prediction store for
    the version served here: the verdict, its reasons, every test, the window and live accuracy. 404 when the
    monitor has not checked this version yet."""
    model = service.model()
    if service.predictions is None:
        raise ApiError(404, "the prediction store is off (serve.log_predictions=false)", "no_prediction_log")
    try:
        found = await asyncio.to_thread(service.predictions.latest_check, model.name, model.version)
    except VisionloopError as exc:
        raise ApiError(503, f"cannot read the prediction store: {exc}", "store_unavailable") from None
    if found is None:
        raise ApiError(
            404,
            f"no drift check of {model.name} v{model.version} yet: run `visionloop monitor` (or `visionloop monitor "
            "check`) against the same store (monitor.store_url)",
            "no_drift_check",
        )
    return found
