"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

`APIError` is what the HTTP layer raises; `to_api_error` maps every other exception the engine or the
request parsing can raise to one, so a route never decides a status code itself.
"""
from __future__ import annotations

import json

from fastapi.responses import Response

from adapters.config import AdapterError
from adapters.paths import AdapterPathNotFound
from adapters.registry import AdapterNotFound
from server.async_engine import EngineOverloaded, EngineShutdown, RequestFailed
from server.sampling import ParamError

# status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after          # seconds, sent as a Retry-After header (503s)

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message quoting the client's input can hold anything, even lone surrogates
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


class ModelNotFound(APIError):
    def __init__(self, name: str, available: list[str]):
        super().__init__(404, f"The model {name!r} does not exist. Available: {', '.join(available)}",
                         param="model", code="model_not_found")


def to_api_error(exc: BaseException) -> APIError:
    """The APIError a client should see for `exc` (internal details of unexpected errors stay in the log)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ParamError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, AdapterNotFound):
        return APIError(404, f"The model {exc.args[0]!r} does not exist (no such adapter)", param="model",
                        code="model_not_found")
    if isinstance(exc, AdapterPathNotFound):
        return APIError(404, str(exc), code="adapter_not_found")
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), code="invalid_adapter")
    if isinstance(exc, EngineOverloaded):
        return APIError(503, str(exc), code="overloaded", retry_after=1)
    if isinstance(exc, EngineShutdown):
        return APIError(503, str(exc), code="shutting_down", retry_after=5)
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), code="internal_error")
    return APIError(500, f"internal error ({type(exc).__name__})", code="internal_error")


# pydantic error types of a value of the right JSON type outside the documented limits (HTTP 400, as OpenAI);
# any other (missing field, wrong type) is a schema error (HTTP 422).
VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "string_too_short", "string_too_long", "string_pattern_mismatch", "finite_number", "string_unicode",
                "value_error"}


def from_validation_errors(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError.errors() as one APIError: 400 for a body that is not JSON or for values
    outside the schema's limits (every bad field has a value of the right type, or of the right type for one
    member of its union), else 422.

    `param` is the first offending field (e.g. "temperature", "messages.0.role"); one message per field.
    """
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return APIError(400, f"request body is not valid JSON ({detail})" if detail else
                            "request body is not valid JSON")
    messages: dict[str, str] = {}
    value_messages: dict[str, str] = {}         # only the errors of values outside limits
    members: dict[tuple, bool] = {}             # (top-level field, union members) -> only value errors there
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        field = ".".join(str(part) for part in loc if not _is_union_tag(part))
        is_value = error.get("type") in VALUE_ERRORS
        messages.setdefault(field, error.get("msg", "invalid value"))
        if is_value:
            value_messages.setdefault(field, error.get("msg", "invalid value"))
        member = (str(loc[0]) if loc else "", tuple(str(part) for part in loc if _is_union_tag(part)))
        members[member] = members.get(member, True) and is_value
    # a field is out of range when some member of its union has the right type and only bad values
    out_of_range: dict[str, bool] = {}
    for (top, _), value_only in members.items():
        out_of_range[top] = out_of_range.get(top, False) or value_only
    status = 400 if out_of_range and all(out_of_range.values()) else 422
    if status == 400:                           # a union member of the right type says why; drop the others
        messages = value_messages
    first = next(iter(messages), "")
    text = "; ".join(f"{field or 'body'}: {msg}" for field, msg in messages.items())
    return APIError(status, text or "invalid request body", param=first or None)


def _is_union_tag(part) -> bool:
    """pydantic names the union member that failed in `loc`: ('body', 'prompt', 'list[int]', 0)."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})
