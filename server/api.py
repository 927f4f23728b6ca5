"""The OpenAI-compatible HTTP API. Routes only translate: body -> (prompt ids, SamplingParams, adapter) -> engine,
engine outputs -> OpenAI JSON or SSE. Every error leaves in OpenAI's shape (server/errors.py).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics; LoRAX's
POST /generate and POST /generate_stream (server/lorax_api.py, errors in LoRAX's shape there); admin routes
(their own key when --admin-api-key is set): POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter,
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
from server.choices import fan_in
from server.draining import Drain, DrainGate
from server.errors import APIError, ModelNotFound, from_validation_errors, to_api_error
from server.lifecycle import AdapterLifecycle, AdapterList, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.lorax import LORAX_ROUTES, LoraxError, lorax_error_type
from server.lorax_api import add_lorax_routes
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

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", *ADMIN_ROUTES,
          *LORAX_ROUTES}
CLIENT_CLOSED = 499              # nginx's status for "client closed request"; nobody receives it
MAX_BODY_BYTES = 8 * 2**20       # default request-body limit (413 beyond it)
TOKENIZE_THREADS = 2             # prompts tokenized at once, off the event loop


def resolve_model(name: str, base_name: str, adapters, adapter_id: str | None = None) -> str | None:
    """The adapter a request names, or None for the base model; ModelNotFound otherwise.

    vLLM convention: `model` is the base model's name or an adapter's; SGLang's `base:adapter` names the
    adapter too. LoRAX's `adapter_id`, when given, names the adapter whatever `model` says. `adapters` is the
    engine's registry (read-only here; the engine checks again when the request arrives, in case the adapter
    was unloaded meanwhile)."""
    wanted = adapter_id or name
    if adapter_id is None and name == base_name:
        return None
    if wanted in adapters:
        return wanted
    if adapter_id is None and name.startswith(base_name + ":") and name[len(base_name) + 1:] in adapters:
        return name[len(base_name) + 1:]
    raise ModelNotFound(wanted, [base_name, *sorted(adapters.handles)])


def sglang_adapter(name: str, base_name: str) -> str:
    """The adapter part of SGLang's `base:adapter` model name (`name` itself otherwise)."""
    return name[len(base_name) + 1:] if name.startswith(base_name + ":") else name


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
        self.eos_token_ids = engine.eos_token_ids
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
            wanted = body.adapter_id or sglang_adapter(body.model, self.model_name)
            if await self.lifecycle.load_on_demand(wanted):
                return wanted
            raise

    async def compile_grammar(self, params: SamplingParams) -> None:
        """An invalid schema / regex / grammar is a 400 here, compiled off the event loop (the engine finds it
        in the cache)."""
        if params.guided is not None:
            await asyncio.to_thread(self.grammars.compile, params.guided)

    async def encode(self, prompt: str | list[int], context_len: int) -> list[int]:
        """Token ids of a text prompt (token ids pass through)."""
        if not isinstance(prompt, str):
            return prompt
        self.prompts.check_length(prompt, context_len, "prompt")
        return await self.prompts.run(lambda t: t.encode(prompt), len(prompt))

    def generate_many(self, prompt_ids: list[list[int]], params: SamplingParams, adapter: str | None,
                      request_id: str, adapter_drop: int | None = None) -> AsyncIterator[RequestOutput]:
        """One engine request per prompt, merged (server/choices.py): output index = prompt * samples + sample."""
        ids = [request_id] if len(prompt_ids) == 1 else [f"{request_id}-{p}" for p in range(len(prompt_ids))]
        return fan_in([self.generate(prompt, params, adapter, rid, adapter_drop)
                       for prompt, rid in zip(prompt_ids, ids)], params.num_samples)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                       request_id: str, adapter_drop: int | None = None) -> AsyncIterator[RequestOutput]:
        start = time.monotonic()
        first: float | None = None          # when the first generated token arrived
        num_open, num_output_tokens = params.num_samples, 0
        generation = self.async_engine.generate(prompt_ids, params, adapter, request_id, adapter_drop)
        async with aclosing(generation) as outputs:
            async for out in outputs:
                now = time.monotonic()
                if first is None and out.num_output_tokens:
                    first = now
                    self.metrics.time_to_first_token.observe(now - start)
                if out.finished:
                    num_open -= 1
                    num_output_tokens += out.num_output_tokens
                if out.finished and num_open == 0:      # once per request, its samples' tokens together
                    self.metrics.observe_finished(self.mixtures.metrics_label(adapter), out.num_prompt_tokens,
                                                  num_output_tokens, now - start,
                                                  None if first is None else now - first, out.queue_seconds)
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
        prompts = body.prompts()
        params = body.sampling_params()
        await serving.compile_grammar(params)
        prompt_ids = [await serving.encode(prompt, serving.context_len(adapter)) for prompt in prompts]
        echo_texts = None
        if body.echo:
            echo_texts = [prompt if isinstance(prompt, str) else
                          await serving.prompts.run(lambda t, p=prompt: t.decode(p), len(prompt))
                          for prompt in prompts]
        request_id = new_id("cmpl")
        formatter = CompletionFormatter(serving.tokenizer, request_id, body.model, echo_texts=echo_texts,
                                        include_usage=body.include_usage, n=body.n,
                                        num_choices=len(prompts) * body.n, best_of=params.best_of,
                                        tokens_as_ids=body.return_tokens_as_token_ids)
        outputs = serving.generate_many(prompt_ids, params, adapter, request_id, body.adapter_drop)
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
        formatter = ChatFormatter(serving.tokenizer, request_id, body.model, include_usage=body.include_usage,
                                  n=body.n, tokens_as_ids=body.return_tokens_as_token_ids)
        outputs = serving.generate(prompt_ids, params, adapter, request_id, body.adapter_drop)
        return await _respond(request, outputs, formatter, body.stream)

    add_lorax_routes(app, serving, _until_disconnect)

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
def _shaped(request: Request, error: APIError) -> Response:
    """OpenAI's error body, or LoRAX's `{"error", "error_type"}` on LoRAX's routes (its clients parse that)."""
    if request.url.path not in LORAX_ROUTES:
        return error.response()
    body = LoraxError(error=error.message, error_type=lorax_error_type(error.status))
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return Response(body.model_dump_json(), status_code=error.status, media_type="application/json",
                    headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        error = to_api_error(exc)
        if error.status >= 500:         # an unexpected exception's traceback is logged by the server
            log.log(logging.ERROR if error.status == 500 else logging.WARNING, "%s %s failed: %s",
                    request.method, request.url.path, exc)
        return _shaped(request, error)

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _shaped(request, from_validation_errors(list(exc.errors())))

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _shaped(request, APIError(exc.status_code, str(exc.detail)))

    for exc_class in (APIError, ParamError, AdapterError, AdapterNotFound, EngineOverloaded, EngineShutdown,
                      RequestFailed, Exception):
        app.add_exception_handler(exc_class, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
