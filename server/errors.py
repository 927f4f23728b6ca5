"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

`APIError` is what the HTTP layer raises; `to_api_error` maps every other exception the engine or the
request parsing can raise to one, so a route never decides a status code itself.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

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
    422: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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
        return APIError(503, str(exc), code="overloaded")
    if isinstance(exc, EngineShutdown):
        return APIError(503, str(exc), code="shutting_down")
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), code="internal_error")
    return APIError(500, f"internal error ({type(exc).__name__})", code="internal_error")


def from_validation_errors(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError.errors() as one APIError: 400 for a body that is not JSON, else 422.

    `param` is the first offending field (e.g. "temperature", "messages.0.role"); one message per field.
    """
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return APIError(400, f"request body is not valid JSON ({detail})" if detail else
                            "request body is not valid JSON")
    messages: dict[str, str] = {}
    for error in errors:
        field = ".".join(str(part) for part in error.get("loc", ()) if part != "body" and not _is_union_tag(part))
        messages.setdefault(field, error.get("msg", "invalid value"))
    first = next(iter(messages), "")
    text = "; ".join(f"{field or 'body'}: {msg}" for field, msg in messages.items())
    return APIError(422, text or "invalid request body", param=first or None)


def _is_union_tag(part) -> bool:
    """pydantic names the union member that failed in `loc`: ('body', 'prompt', 'list[int]', 0)."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})
