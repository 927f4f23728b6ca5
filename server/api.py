"""The OpenAI-compatible HTTP API. Routes only translate: body -> (prompt ids, SamplingParams, adapter) -> engine,
engine outputs -> OpenAI JSON or SSE. Every error leaves in OpenAI's shape (server/errors.py).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics; admin
routes (their own key when --admin-api-key is set): POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter,
GET /v1/adapters (server/lifecycle.py does the work).
A client that disconnects has its request aborted, streaming or not, so its KV blocks are freed.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.config import AdapterError
from adapters.paths import AdapterRoots
from adapters.registry import AdapterNotFound
from server.async_engine import AsyncEngine, EngineOverloaded, EngineShutdown, RequestFailed
from server.draining import Drain, DrainGate
from server.errors import APIError, ModelNotFound, from_validation_errors, to_api_error
from server.lifecycle import AdapterLifecycle, AdapterList, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.metrics import RequestCounter, ServerMetrics
from server.middleware import ADMIN_ROUTES, BearerAuth, BodySizeLimit
from server.mixtures import Mixtures
from server.openapi import admin_responses, generation_responses, plain_text, responses
from server.outputs import RequestOutput
from server.prompt_tokenizer import PromptTokenizer
from server.formatters import ChatFormatter, CompletionFormatter
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                             Health, ModelCard, ModelList, new_id)
from server.sampling import ParamError, SamplingParams

log = logging.getLogger(__name__)

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", *ADMIN_ROUTES}
CLIENT_CLOSED = 499              # nginx's status for "client closed request"; nobody receives it
MAX_BODY_BYTES = 8 * 2**20       # default request-body limit (413 beyond it)
TOKENIZE_THREADS = 2             # prompts tokenized at once, off the event loop


def resolve_model(name: str, base_name: str, adapters, adapter_id: str | None = None) -> str | None:
    """The adapter a request names, or None for the base model; ModelNotFound otherwise.

    vLLM convention: `model` is the base model's name or an adapter's. LoRAX's `adapter_id`, when given,
    names the adapter whatever `model` says. `adapters` is the engine's registry (read-only here; the
    engine checks again when the request arrives, in case the adapter was unloaded meanwhile)."""
    wanted = adapter_id or name
    if adapter_id is None and name == base_name:
        return None
    if wanted in adapters:
        return wanted
    raise ModelNotFound(wanted, [base_name, *sorted(adapters.handles)])


class _Serving:
    """What the routes share: the engine, the HTTP side's tokenizers, metrics."""

    def __init__(self, async_engine: AsyncEngine, metrics: ServerMetrics, lifecycle: AdapterLifecycle):
        engine = async_engine.engine
        self.async_engine = async_engine
        # The engine thread detokenizes with engine.tokenizer; a Rust tokenizer must not be shared across threads.
        # `tokenizer` (event loop) decodes a few ids per output; whole prompts go to `prompts` (worker threads).
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.prompts = PromptTokenizer(engine.tokenizer, TOKENIZE_THREADS)
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.context_len = engine.context_len         # max_model_len less an adapter's virtual tokens
        self.adapters = engine.adapters
        self.grammars = engine.guided.grammars        # structured output: compiled at admission, cached
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.mixtures = Mixtures(async_engine, lifecycle)

    def close(self) -> None:
        self.prompts.close()
        self.mixtures.close()

    async def resolve(self, body) -> str | None:
        """resolve_model, loading an adapter that is not loaded yet from an --adapter-dir just in time; with
        `merged_adapters`, the registry name of that mixture (computed on first use, server/mixtures.py)."""
        merged = getattr(body, "merged_adapters", None)
        if merged is not None:
            if body.adapter_id is not None:
                raise APIError(400, "give at most one of adapter_id and merged_adapters", param="merged_adapters")
            return await self.mixtures.resolve(merged)
        try:
            return resolve_model(body.model, self.model_name, self.adapters, body.adapter_id)
        except ModelNotFound:
            wanted = body.adapter_id or body.model
            if await self.lifecycle.load_on_demand(wanted):
                return wanted
            raise

    async def compile_grammar(self, params: SamplingParams) -> None:
        """An invalid schema / regex / grammar is a 400 here, compiled off the event loop (the engine finds it
        in the cache)."""
        if params.guided is not None:
            await asyncio.to_thread(self.grammars.compile, params.guided)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                       request_id: str, adapter_drop: int | None = None) -> AsyncIterator[RequestOutput]:
        start = time.monotonic()
        first: float | None = None          # when the first generated token arrived
        generation = self.async_engine.generate(prompt_ids, params, adapter, request_id, adapter_drop)
        async with aclosing(generation) as outputs:
            async for out in outputs:
                now = time.monotonic()
                if first is None and out.num_output_tokens:
                    first = now
                    self.metrics.time_to_first_token.observe(now - start)
                if out.finished:
                    self.metrics.observe_finished(self.mixtures.metrics_label(adapter), out.num_prompt_tokens, out.num_output_tokens,
                                                  now - start, None if first is None else now - first,
                                                  out.queue_seconds)
                yield out


def build_app(async_engine: AsyncEngine, *, api_key: str | None = None, admin_api_key: str | None = None,
              adapter_dirs: list[str] = (), max_body_bytes: int = MAX_BODY_BYTES,
              drain: Drain | None = None) -> FastAPI:
    """The app serving `async_engine`; it starts the engine thread on startup and stops it on shutdown.

    `api_key` guards the /v1/ routes; `admin_api_key` (default: `api_key`) guards ADMIN_ROUTES instead.
    Adapters load from inside `adapter_dirs` (by relative path, or just in time by name) or from the
    directories of adapters already loaded when the app is built (the preloaded ones). A request body over
    `max_body_bytes` is a 413. Once `drain` (server/draining.py: SIGTERM) begins, /v1/ requests are 503s and
    /health says "draining"."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            serving.close()
            await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="peftserve", lifespan=lifespan)
    metrics = ServerMetrics(async_engine.stats, known_paths=ROUTES, model_name=async_engine.engine.model_name)
    async_engine.engine.adapters.read_observers.append(metrics.observe_adapter_read)
    preloaded = [h.path for h in async_engine.engine.adapters.handles.values()]
    lifecycle = AdapterLifecycle(async_engine, AdapterRoots(adapter_dirs, preloaded))
    serving = _Serving(async_engine, metrics, lifecycle)
    app.state.mixtures = serving.mixtures
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key or admin_api_key:
        app.add_middleware(BearerAuth, api_key=api_key, admin_api_key=admin_api_key or api_key)
    drain = drain or Drain()
    app.add_middleware(DrainGate, drain=drain)
    app.add_middleware(RequestCounter, metrics=metrics)     # outermost: counts 401s and 413s too

    @app.post("/v1/completions", response_model=None, responses=generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request):
        adapter = await serving.resolve(body)
        prompt = body.single_prompt()
        params = body.sampling_params()
        await serving.compile_grammar(params)
        if isinstance(prompt, str):
            serving.prompts.check_length(prompt, serving.context_len(adapter), "prompt")
            prompt_ids = await serving.prompts.run(lambda t: t.encode(prompt), len(prompt))
        else:
            prompt_ids = prompt
        echo_text = "" if not body.echo else prompt if isinstance(prompt, str) else \
            await serving.prompts.run(lambda t: t.decode(prompt), len(prompt))
        request_id = new_id("cmpl")
        formatter = CompletionFormatter(serving.tokenizer, request_id, body.model, echo_text=echo_text,
                                        include_usage=body.include_usage)
        outputs = serving.generate(prompt_ids, params, adapter, request_id, body.adapter_drop)
        return await _respond(request, outputs, formatter, body.stream)

    @app.post("/v1/chat/completions", response_model=None, responses=generation_responses(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = await serving.resolve(body)
        context_len = serving.context_len(adapter)
        num_chars = sum(len(m.template_dict()["content"]) for m in body.messages)
        prompt_ids = await serving.prompts.run(lambda t: _chat_prompt_ids(t, body, serving.prompts, context_len),
                                               num_chars)
        params = body.sampling_params(len(prompt_ids), context_len)
        await serving.compile_grammar(params)
        request_id = new_id("chatcmpl")
        formatter = ChatFormatter(serving.tokenizer, request_id, body.model, include_usage=body.include_usage)
        outputs = serving.generate(prompt_ids, params, adapter, request_id, body.adapter_drop)
        return await _respond(request, outputs, formatter, body.stream)

    @app.get("/v1/models", responses=responses(401))
    async def models() -> ModelList:
        cards = [ModelCard(id=serving.model_name, max_model_len=serving.max_model_len)]
        cards += [ModelCard(id=name, parent=serving.model_name, root=handle.path,
                            max_model_len=serving.context_len(name))
                  for name, handle in sorted(serving.adapters.handles.items())]
        return ModelList(data=cards)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses=admin_responses("Success: LoRA adapter 'NAME' added successfully."))
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        await lifecycle.load(body.lora_name, body.lora_path, replace=body.load_inplace, pinned=body.pinned,
                             drop_layers=body.adapter_drop)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses=admin_responses("Success: LoRA adapter 'NAME' removed successfully."))
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        try:
            await lifecycle.unload(body.lora_name)
        except AdapterNotFound:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="adapter_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/v1/adapters", responses=responses(401))
    async def adapters() -> AdapterList:
        return lifecycle.describe()

    @app.get("/health", responses={503: {"model": Health, "description": "draining (shutting down) or the "
                                                                          "engine is not running"}})
    async def health() -> Health:
        if drain.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not async_engine.is_running:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse, responses=plain_text("Prometheus text format"))
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _chat_prompt_ids(tokenizer, body: ChatCompletionRequest, prompts: PromptTokenizer,
                     context_len: int) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    messages = [message.template_dict() for message in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
    prompts.check_length(text, context_len, "messages")
    return tokenizer.encode(text, add_special_tokens=False)     # the template adds any BOS itself


# ---- responses -------------------------------------------------------------------------------------------------
async def _respond(request: Request, outputs: AsyncIterator[RequestOutput], formatter, stream: bool) -> Response:
    """One JSON body, or an SSE stream. Errors before the first output (rejected prompt, overload) still get
    their own status code: a stream's headers are sent only once the first output is here."""
    if not stream:
        async def collect():
            async with aclosing(outputs):
                return formatter.response([out async for out in outputs])
        return _json(await _until_disconnect(request, collect()))

    first = await _until_disconnect(request, _first(outputs))

    async def events() -> AsyncIterator[str]:
        async with aclosing(outputs):
            try:
                for event in formatter.events(first):
                    yield _sse(event)
                async for out in outputs:
                    for event in formatter.events(out):
                        yield _sse(event)
            except Exception as exc:            # headers are gone: report in-band, as OpenAI does
                error = to_api_error(exc)
                if error.status >= 500:
                    log.error("stream failed: %s", exc, exc_info=not isinstance(exc, (APIError, RequestFailed)))
                yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _first(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise


def _sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json(exclude_none=False)}\n\n"


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def _until_disconnect(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it (which aborts its request) and answer 499."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise APIError(CLIENT_CLOSED, "client closed the request")
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- errors -------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        error = to_api_error(exc)
        if error.status >= 500:         # an unexpected exception's traceback is logged by the server
            log.log(logging.ERROR if error.status == 500 else logging.WARNING, "%s %s failed: %s",
                    request.method, request.url.path, exc)
        return error.response()

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return from_validation_errors(list(exc.errors())).response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    for exc_class in (APIError, ParamError, AdapterError, AdapterNotFound, EngineOverloaded, EngineShutdown,
                      RequestFailed, Exception):
        app.add_exception_handler(exc_class, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
