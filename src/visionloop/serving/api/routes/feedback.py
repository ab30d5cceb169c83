"""POST /feedback: the true label of an earlier prediction, for live accuracy."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Header

from visionloop.monitoring.store import StoreError
from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.schemas import ERRORS, ErrorBody, FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["predict"])


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    responses=ERRORS | {401: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def feedback(
    body: FeedbackRequest, service: ServiceDep, authorization: Annotated[str | None, Header()] = None
) -> FeedbackResponse:
    """Tell the service the true label of an earlier prediction (by its `request_id`); monitoring
    turns these into live accuracy. Needs `Authorization: Bearer <serve.feedback_token>` when a token is
    set: labels become training data, so anyone who can reach the server must not be able to write them."""
    token = service.settings.serve.feedback_token
    if token and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        raise ApiError(401, "POST /feedback needs 'Authorization: Bearer <serve.feedback_token>'", "unauthorized")
    if service.predictions is None:
        raise ApiError(404, "the prediction store is off (serve.log_predictions=false)", "no_prediction_log")
    try:
        result = await asyncio.to_thread(service.predictions.add_feedback, body.request_id, body.label, bool(token))
    except StoreError as exc:  # the database is down or timed out: try again later
        raise ApiError(503, str(exc), "store_unavailable") from None
    service.metrics.feedback.labels(result.model_version, str(result.correct).lower()).inc()
    return FeedbackResponse(**result.__dict__)
