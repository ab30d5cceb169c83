"""POST /feedback: the true label of an earlier prediction, for live accuracy."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from visionloop.monitoring.store import StoreError
from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.schemas import ERRORS, ErrorBody, FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["predict"])


@router.post("/feedback", response_model=FeedbackResponse, responses=ERRORS | {409: {"model": ErrorBody}})
async def feedback(body: FeedbackRequest, service: ServiceDep) -> FeedbackResponse:
    """Tell the service the true label of an earlier prediction (by its `request_id`); monitoring
    turns these into live accuracy."""
    if service.predictions is None:
        raise ApiError(404, "the prediction store is off (serve.log_predictions=false)", "no_prediction_log")
    try:
        result = await asyncio.to_thread(service.predictions.add_feedback, body.request_id, body.label)
    except StoreError as exc:  # the database is down or timed out: try again later
        raise ApiError(503, str(exc), "store_unavailable") from None
    service.metrics.feedback.labels(result.model_version, str(result.correct).lower()).inc()
    return FeedbackResponse(**result.__dict__)
