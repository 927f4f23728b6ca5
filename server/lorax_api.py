"""LoRAX's routes: POST /generate and POST /generate_stream (bodies and formatting in server/lorax.py).

`parameters.adapter_id` names the adapter (a loaded one, or one under --adapter-dir, loaded just in time); no
adapter_id = the base model. The request runs like any other: same engine, same sampling.
"""
from __future__ import annotations

import json
import logging
from contextlib import aclosing
from types import SimpleNamespace
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from server.errors import to_api_error
from server.lorax import (GenerateRequest, GenerateResponse, LoraxError, LoraxFormatter, StreamResponse,
                          lorax_error_type)
from server.outputs import RequestOutput
from server.protocol import new_id
from server.sampling import ParamError

log = logging.getLogger(__name__)

ERRORS = {400: "bad parameter value, or an adapter_source other than local",
          401: "missing or wrong API key (when the server has one)", 404: "unknown adapter",
          413: "request body larger than the server's limit", 422: "body does not match the schema",
          500: "internal error while running this request", 503: "overloaded or shutting down; retry later"}


def _responses(model, stream: bool) -> dict:
    ok = {"model": model, "description": "server-sent events `data: <StreamResponse>`, one per token; the last "
                                         "has generated_text (and details)" if stream else "the generation"}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    return {200: ok, **{status: {"model": LoraxError, "description": text} for status, text in ERRORS.items()}}


def add_lorax_routes(app: FastAPI, serving, until_disconnect: Callable) -> None:
    """`serving`: server.api's _Serving; `until_disconnect(request, awaitable)`: server.api's, which cancels the
    work (aborting the request) when the client goes away."""

    async def start(body: GenerateRequest, stream: bool) -> tuple[AsyncIterator[RequestOutput], LoraxFormatter]:
        params = body.parameters
        params.check(stream)
        adapter = await serving.resolve(SimpleNamespace(model=serving.model_name, adapter_id=params.adapter_id,
                                                        merged_adapters=params.merged_adapters))
        context_len = serving.context_len(adapter)
        prompt_ids = await serving.encode(body.inputs, context_len)
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate:]
        max_tokens = params.max_new_tokens
        if max_tokens is None:
            if len(prompt_ids) >= context_len:
                raise ParamError(f"This model's maximum context length is {context_len} tokens; the inputs have "
                                 f"{len(prompt_ids)} tokens", "inputs")
            max_tokens = context_len - len(prompt_ids)
        sampling = params.sampling_params(max_tokens, stream)
        formatter = LoraxFormatter(serving.tokenizer, serving.eos_token_ids, body.inputs, prompt_ids, params,
                                   sampling)
        return serving.generate_many([prompt_ids], sampling, adapter, new_id("generate")), formatter

    @app.post("/generate", response_model=None, responses=_responses(GenerateResponse, stream=False))
    async def generate(body: GenerateRequest, request: Request):
        outputs, formatter = await start(body, stream=False)

        async def collect():
            async with aclosing(outputs):
                return formatter.response([out async for out in outputs])
        response = await until_disconnect(request, collect())
        return Response(response.model_dump_json(), media_type="application/json")

    @app.post("/generate_stream", response_model=None, responses=_responses(StreamResponse, stream=True))
    async def generate_stream(body: GenerateRequest, request: Request):
        outputs, formatter = await start(body, stream=True)
        first = await until_disconnect(request, _first(outputs))

        async def events() -> AsyncIterator[str]:
            async with aclosing(outputs):
                try:
                    for event in formatter.events(first):
                        yield f"data: {event.model_dump_json()}\n\n"
                    async for out in outputs:
                        for event in formatter.events(out):
                            yield f"data: {event.model_dump_json()}\n\n"
                except Exception as exc:        # headers are gone: report in-band, as LoRAX does
                    error = to_api_error(exc)
                    if error.status >= 500:
                        log.error("stream failed: %s", exc)
                    yield f"data: {json.dumps({'error': error.message, 'error_type': lorax_error_type(error.status)})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _first(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise
