"""The request and response models of the HTTP API, shared by the route modules and the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictInt, StrictStr


class LabelScore(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    request_id: str = Field(description="Quote it to POST /feedback with the true label.")
    filename: str | None = None
    label: str
    confidence: float
    top_k: list[LabelScore]
    converted: str | None = Field(
        None,
        description="The colour-mode conversion applied, e.g. RGBA->L; null when the upload was in the model's "
        "mode (resizing to the model's size is always applied and not stated).",
    )


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[ImagePrediction]


class PredictJson(BaseModel):
    images: list[str] = Field(description="Base64-encoded image files (PNG, JPEG, …); data: URLs are accepted.")
    top_k: int | None = Field(None, ge=1, description="Labels per image (default: setting serve.top_k).")
    convert: bool | None = Field(
        None,
        description="Convert colour mode and size as training did (default: setting serve.convert); "
        "false refuses a mode other than the model's with 422. Wins over the query parameter.",
    )


class FeedbackRequest(BaseModel):
    request_id: StrictStr = Field(min_length=1, max_length=200)
    label: StrictStr | StrictInt = Field(description="The true class, by name or by index.")


class FeedbackResponse(BaseModel):
    request_id: str
    model_version: str
    predicted_label: str
    true_label: str
    correct: bool


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503)
}  # fmt: skip
