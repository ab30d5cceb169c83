"""The one error type the HTTP layer turns into a ``{"error": ...}`` body (the V2 protocol's shape)."""

from __future__ import annotations


class ApiError(Exception):
    """A client or availability problem with its HTTP status; ``reason`` labels the bad-request metric."""

    def __init__(
        self, status: int, message: str, reason: str = "bad_request", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers  # sent with the answer, e.g. Retry-After on a 503

    def __reduce__(self) -> tuple:
        """Pickle as the same error with the same fields: the decode and parse worker processes raise it, and
        ``concurrent.futures`` re-raises it in the server (Exception's own pickling would call ``__init__`` with
        the message alone)."""
        return _rebuild, (type(self), dict(self.__dict__))


def _rebuild(cls: type[ApiError], fields: dict) -> ApiError:
    error = cls.__new__(cls)
    Exception.__init__(error, fields["message"])
    error.__dict__.update(fields)
    return error


def first_error(exc: Exception) -> str:
    """Where and what the first problem of a pydantic/FastAPI validation error is, for a one-line message."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return f"{where}: {first.get('msg')}"
    return str(exc)
