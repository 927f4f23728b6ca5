"""What /openapi.json says each route answers besides its 200 model: the error statuses (all in OpenAI's shape),
the event stream of `stream: true`, and plain-text bodies. Routes return Response objects, so FastAPI can't infer
these; tests/http/test_fuzz.py checks every response against them."""
from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {
    400: "bad parameter value (outside the documented limits, or a token id outside the vocabulary, a prompt "
         "longer than the context, an adapter that does not fit), malformed JSON, or a bad adapter checkpoint",
    401: "missing or wrong API key (when the server has one)",
    404: "unknown model or adapter, or no adapter at the path",
    413: "request body larger than the server's limit",
    422: "body does not match the schema (missing field, wrong type)",
    500: "internal error while running this request (other requests are not affected)",
    503: "overloaded (too many requests waiting) or shutting down; retry later",
}


def responses(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}


def generation_responses(model: type[BaseModel]) -> dict:
    """/v1/completions, /v1/chat/completions: JSON, or with `stream: true` server-sent events, each
    `data: <chunk JSON>` and last `data: [DONE]` (an error after the first event comes as `data: {"error": ...}`)."""
    return {200: {"model": model, "description": "the completion; with stream=true an event stream of chunks",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **responses(400, 401, 404, 413, 422, 500, 503)}


def admin_responses(success: str) -> dict:
    """Load / unload: the 200 body is text (vLLM's), errors are JSON. Explicit content, since a route whose
    response_class is text would otherwise document its error models as text too (the ErrorResponse component
    itself is registered by the generation routes)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {**plain_text(success),
            **{status: {"description": ERRORS[status], "content": error}
               for status in (400, 401, 404, 413, 422, 500, 503)}}


def plain_text(description: str) -> dict:
    return {200: {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}}
