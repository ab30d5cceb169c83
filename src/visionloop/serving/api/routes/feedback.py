"""POST /feedback: the true label of an earlier prediction, for live accuracy."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header

from visionloop.monitoring.store import StoreError
from visionloop.serving.admission import RETRY_LATER
from visionloop.serving.api.deps import ServiceDep
from visionloop.serving.errors import ApiError
from visionloop.serving.schemas import ERRORS, ErrorBody, FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["predict"])
# a working store writes queued predictions within ~50 ms (monitoring/writer.py); rows older than this mean its
# writes are failing, and add_feedback would wait up to monitor.store_timeout_seconds for them
STORE_BEHIND_SECONDS = 2.0


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
    lag = service.predictions.lag_seconds
    if lag > STORE_BEHIND_SECONDS:  # add_feedback would first wait for those rows: say so now, not in 10+ s
        raise ApiError(
            503,
            f"the prediction store is not taking writes (oldest unwritten prediction {lag:.0f} s old); try again later",
            "store_behind",
            RETRY_LATER,
        )
    try:
        # its own bounded pool: a store outage holds these threads, never the ones decoding uploads
        result = await service.feedback_pool.run(
            1, service.predictions.add_feedback, body.request_id, body.label, bool(token)
        )
    except StoreError as exc:  # the database is down or timed out: try again later
        raise ApiError(503, str(exc), "store_unavailable") from None
    service.metrics.feedback.labels(result.model_version, str(result.correct).lower()).inc()
    return FeedbackResponse(**result.__dict__)
