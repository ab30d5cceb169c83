"""The one error type the HTTP layer turns into a ``{"error": ...}`` body (the V2 protocol's shape)."""

from __future__ import annotations


class ApiError(Exception):
    """A client or availability problem with its HTTP status; ``reason`` labels the bad-request metric."""

    def __init__(self, status: int, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


class BodyTooLarge(ApiError):
    """Raised from the capped body stream when a body without Content-Length runs over the limit."""

    def __init__(self, size: int, limit_mb: float) -> None:
        super().__init__(
            413, f"request body of {size:,}+ bytes is over the limit of {limit_mb:g} MiB", "body_too_large"
        )


def first_error(exc: Exception) -> str:
    """Where and what the first problem of a pydantic/FastAPI validation error is, for a one-line message."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return f"{where}: {first.get('msg')}"
    return str(exc)
