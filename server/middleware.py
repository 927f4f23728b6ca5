"""ASGI middleware in front of the routes: the bearer-key check and the request-body size limit. Both answer in
OpenAI's error shape before any route (or JSON parsing) runs."""
from __future__ import annotations

import secrets

from server.errors import APIError

INFERENCE_PREFIX = "/v1/"        # paths that need the API key when one is set
LORAX_ROUTES = frozenset({"/generate", "/generate_stream"})     # LoRAX's, guarded like /v1/
ADMIN_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters"}


def is_inference(path: str) -> bool:
    """Paths that need the API key and that draining refuses: /v1/ and LoRAX's routes."""
    return path.startswith(INFERENCE_PREFIX) or path in LORAX_ROUTES


class BearerAuth:
    """ADMIN_ROUTES need `Authorization: Bearer <admin_api_key>`, other inference paths (/v1/, LoRAX's)
    `Bearer <api_key>` (a key that is None lets its paths through)."""

    def __init__(self, app, api_key: str | None, admin_api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.expected_admin = f"Bearer {admin_api_key}".encode() if admin_api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and is_inference(scope["path"]):
            is_admin = scope["path"] in ADMIN_ROUTES
            expected = self.expected_admin if is_admin else self.expected
            given = dict(scope["headers"]).get(b"authorization", b"")
            if expected is not None and not secrets.compare_digest(given, expected):
                which = "admin API key" if is_admin else "API key"
                error = APIError(401, f"missing or invalid {which} (send 'Authorization: Bearer <key>')",
                                 code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """A request body over `max_bytes` is a 413, answered from its Content-Length before a byte is read, or as
    soon as a chunked body passes the limit. Smaller bodies are read whole here and handed on in one message,
    so JSON parsing and tokenization never see more than `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":         # the client left while sending: nothing to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                          # later: the disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = APIError(413, f"request body is larger than the server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)
