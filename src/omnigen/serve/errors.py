"""The service's error type and its one JSON shape, OpenAI's: ``{"error": {"message", "type", "param",
"code"}}`` (+ ``limit`` naming the request limit a request exceeded).

``type`` follows from the HTTP status (``ERROR_TYPES``), so that OpenAI clients raise the exception they
raise for OpenAI's own errors (the ``openai`` package maps the status: 400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError). ``code`` is ours
and specific (``limit_exceeded``, ``queue_full``, ``invalid_image``, ...); ``param`` names the request field
at fault when there is one.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    limit: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """A client-facing error: HTTP status + the JSON error body (+ headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        limit: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(
            message=message, type=error_type(status), param=field, code=code, limit=limit
        )

    def response(self) -> JSONResponse:
        body = self.detail.model_dump()
        if body["limit"] is None:
            del body["limit"]  # message, type, param and code are always there, as in OpenAI's errors
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)
