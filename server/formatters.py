"""Engine outputs -> OpenAI response bodies and stream chunks, one formatter per endpoint (the models are in
server/protocol.py)."""
from __future__ import annotations

from pydantic import BaseModel

from server.outputs import RequestOutput, TokenLogprob
from server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatLogprobs,
                             ChatMessageOut, ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
                             CompletionLogprobs, CompletionResponse, TopLogprob, Usage)


class _Formatter:
    """Turns one request's RequestOutputs into OpenAI objects.

    `events(out)` gives the stream chunks for one output; `response(outputs)` the non-streamed body, built from
    the same pieces, so a streamed reply concatenates to exactly the non-streamed one.
    """

    def __init__(self, tokenizer, request_id: str, model: str, include_usage: bool = False):
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage

    def _token_strings(self, logprobs: list[TokenLogprob]) -> tuple[list[str], list[list[str]]]:
        """Decoded text of each sampled token and of each of its top alternatives (one tokenizer call)."""
        ids = [[lp.token_id] for lp in logprobs] + [[t] for lp in logprobs for t, _ in lp.top]
        strings = self.tokenizer.batch_decode(ids) if ids else []
        sampled, rest = strings[:len(logprobs)], iter(strings[len(logprobs):])
        return sampled, [[next(rest) for _ in lp.top] for lp in logprobs]

    @staticmethod
    def usage(out: RequestOutput) -> Usage:
        return Usage.of(out.num_prompt_tokens, out.num_output_tokens)


class CompletionFormatter(_Formatter):
    def __init__(self, tokenizer, request_id: str, model: str, *, echo_text: str = "",
                 include_usage: bool = False):
        super().__init__(tokenizer, request_id, model, include_usage)
        self.pending_echo = echo_text
        self.text_offset = len(echo_text)

    def events(self, out: RequestOutput) -> list[BaseModel]:
        text, self.pending_echo = self.pending_echo + out.text, ""
        logprobs = self._logprobs(out.logprobs) if out.logprobs is not None else None
        events: list[BaseModel] = []
        if text or logprobs or out.finished:
            choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=out.finish_reason)
            events.append(CompletionResponse(id=self.request_id, model=self.model, choices=[choice]))
        if out.finished and self.include_usage:
            events.append(CompletionResponse(id=self.request_id, model=self.model, choices=[],
                                             usage=self.usage(out)))
        return events

    def response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        chunks = [event.choices[0] for out in outputs for event in self.events(out) if event.choices]
        merged = CompletionChoice(text="".join(c.text for c in chunks), finish_reason=outputs[-1].finish_reason)
        if any(c.logprobs is not None for c in chunks):
            merged.logprobs = CompletionLogprobs()
            for c in chunks:
                if c.logprobs is not None:
                    for name in CompletionLogprobs.model_fields:
                        getattr(merged.logprobs, name).extend(getattr(c.logprobs, name))
        return CompletionResponse(id=self.request_id, model=self.model, choices=[merged],
                                  usage=self.usage(outputs[-1]))

    def _logprobs(self, logprobs: list[TokenLogprob]) -> CompletionLogprobs:
        sampled, tops = self._token_strings(logprobs)
        result = CompletionLogprobs(tokens=sampled, token_logprobs=[lp.logprob for lp in logprobs])
        for lp, token, top_strings in zip(logprobs, sampled, tops):
            result.top_logprobs.append(dict(zip(top_strings, (p for _, p in lp.top))) if lp.top else None)
            result.text_offset.append(self.text_offset)
            self.text_offset += len(token)
        return result


class ChatFormatter(_Formatter):
    def __init__(self, tokenizer, request_id: str, model: str, *, include_usage: bool = False):
        super().__init__(tokenizer, request_id, model, include_usage)
        self.sent_role = False

    def events(self, out: RequestOutput) -> list[BaseModel]:
        events: list[BaseModel] = []
        if not self.sent_role:
            self.sent_role = True
            events.append(self._chunk(ChatDelta(role="assistant", content="")))
        logprobs = self._logprobs(out.logprobs) if out.logprobs is not None else None
        if out.text or logprobs:
            events.append(self._chunk(ChatDelta(content=out.text), logprobs=logprobs))
        if out.finished:
            events.append(self._chunk(ChatDelta(), finish_reason=out.finish_reason))
            if self.include_usage:
                events.append(ChatCompletionChunk(id=self.request_id, model=self.model, choices=[],
                                                  usage=self.usage(out)))
        return events

    def response(self, outputs: list[RequestOutput]) -> ChatCompletionResponse:
        content = "".join(out.text for out in outputs)
        logprobs = None
        if any(out.logprobs is not None for out in outputs):
            logprobs = ChatLogprobs(content=[entry for out in outputs if out.logprobs
                                             for entry in self._logprobs(out.logprobs).content])
        choice = ChatChoice(message=ChatMessageOut(content=content), logprobs=logprobs,
                            finish_reason=outputs[-1].finish_reason)
        return ChatCompletionResponse(id=self.request_id, model=self.model, choices=[choice],
                                      usage=self.usage(outputs[-1]))

    def _chunk(self, delta: ChatDelta, *, logprobs: ChatLogprobs | None = None,
               finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatStreamChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice])

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        sampled, tops = self._token_strings(logprobs)
        return ChatLogprobs(content=[
            ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()),
                             top_logprobs=[TopLogprob(token=s, logprob=p, bytes=list(s.encode()))
                                           for s, (_, p) in zip(top_strings, lp.top)])
            for lp, token, top_strings in zip(logprobs, sampled, tops)])
