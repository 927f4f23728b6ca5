"""Engine outputs -> OpenAI response bodies and stream chunks, one formatter per endpoint (the models are in
server/protocol.py)."""
from __future__ import annotations

from pydantic import BaseModel

from server.choices import keep_best
from server.outputs import RequestOutput, TokenLogprob
from server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatLogprobs,
                             ChatMessageOut, ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
                             CompletionLogprobs, CompletionResponse, TopLogprob, Usage)


class _Formatter:
    """Turns one request's RequestOutputs into OpenAI objects.

    Outputs carry their choice index (server/choices.py: prompt_index * n + sample_index); `num_choices` of
    them end. `events(out)` gives the stream chunks for one output (the usage chunk after the last choice ends);
    `response(outputs)` the non-streamed body, built from the same pieces, so a streamed reply concatenates to
    exactly the non-streamed one. Usage: each prompt's tokens once, every returned choice's tokens.
    """

    def __init__(self, tokenizer, request_id: str, model: str, include_usage: bool = False, n: int = 1,
                 num_choices: int = 1, tokens_as_ids: bool = False):
        self.tokenizer = tokenizer
        self.tokens_as_ids = tokens_as_ids      # logprobs name tokens "token_id:<id>" (vLLM's extension)
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.n = n
        self.num_choices = num_choices
        self.finals: dict[int, RequestOutput] = {}

    def _token_strings(self, logprobs: list[TokenLogprob]) -> tuple[list[str], list[list[str]]]:
        """Decoded text of each sampled token and of each of its top alternatives (one tokenizer call)."""
        ids = [[lp.token_id] for lp in logprobs] + [[t] for lp in logprobs for t, _ in lp.top]
        if self.tokens_as_ids:
            strings = [f"token_id:{t}" for t, in ids]
        else:
            strings = self.tokenizer.batch_decode(ids) if ids else []
        sampled, rest = strings[:len(logprobs)], iter(strings[len(logprobs):])
        return sampled, [[next(rest) for _ in lp.top] for lp in logprobs]

    def _note_final(self, out: RequestOutput) -> bool:
        """Record a choice's last output; True when it was the last choice to end."""
        if out.finished:
            self.finals[out.index] = out
        return out.finished and len(self.finals) == self.num_choices

    def usage(self, finals: list[RequestOutput]) -> Usage:
        prompts = {out.index // self.n: out.num_prompt_tokens for out in finals}
        return Usage.of(sum(prompts.values()), sum(out.num_output_tokens for out in finals))

    @staticmethod
    def by_choice(outputs: list[RequestOutput]) -> dict[int, list[RequestOutput]]:
        choices: dict[int, list[RequestOutput]] = {}
        for out in outputs:
            choices.setdefault(out.index, []).append(out)
        return dict(sorted(choices.items()))


class CompletionFormatter(_Formatter):
    def __init__(self, tokenizer, request_id: str, model: str, *, echo_texts: list[str] | None = None,
                 include_usage: bool = False, n: int = 1, num_choices: int = 1, best_of: int | None = None,
                 tokens_as_ids: bool = False):
        """`echo_texts`: per prompt, the text echoed before its choices' completions ("" for none); `best_of`:
        samples generated per prompt, of which `response` keeps the n best (not streamed)."""
        super().__init__(tokenizer, request_id, model, include_usage, n, num_choices, tokens_as_ids)
        self.best_of = best_of
        self.echo_texts = echo_texts or [""]
        self.pending_echo: dict[int, str] = {}        # choice -> echo not sent yet
        self.text_offset: dict[int, int] = {}

    def events(self, out: RequestOutput) -> list[BaseModel]:
        index = out.index
        if index not in self.text_offset:
            echo = self.echo_texts[index // self.n] if index // self.n < len(self.echo_texts) else ""
            self.pending_echo[index], self.text_offset[index] = echo, len(echo)
        text, self.pending_echo[index] = self.pending_echo[index] + out.text, ""
        logprobs = self._logprobs(index, out.logprobs) if out.logprobs is not None else None
        events: list[BaseModel] = []
        if text or logprobs or out.finished:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason)
            events.append(CompletionResponse(id=self.request_id, model=self.model, choices=[choice]))
        if self._note_final(out) and self.include_usage:
            events.append(CompletionResponse(id=self.request_id, model=self.model, choices=[],
                                             usage=self.usage(list(self.finals.values()))))
        return events

    def response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        if self.best_of is not None:
            outputs = keep_best(outputs, self.n, self.best_of)
        choices = [self._merge(index, outs) for index, outs in self.by_choice(outputs).items()]
        finals = [outs[-1] for outs in self.by_choice(outputs).values()]
        return CompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=self.usage(finals))

    def _merge(self, index: int, outputs: list[RequestOutput]) -> CompletionChoice:
        chunks = [event.choices[0] for out in outputs for event in self.events(out) if event.choices]
        merged = CompletionChoice(index=index, text="".join(c.text for c in chunks),
                                  finish_reason=outputs[-1].finish_reason)
        if any(c.logprobs is not None for c in chunks):
            merged.logprobs = CompletionLogprobs()
            for c in chunks:
                if c.logprobs is not None:
                    for name in CompletionLogprobs.model_fields:
                        getattr(merged.logprobs, name).extend(getattr(c.logprobs, name))
        return merged

    def _logprobs(self, index: int, logprobs: list[TokenLogprob]) -> CompletionLogprobs:
        sampled, tops = self._token_strings(logprobs)
        result = CompletionLogprobs(tokens=sampled, token_logprobs=[lp.logprob for lp in logprobs])
        for lp, token, top_strings in zip(logprobs, sampled, tops):
            result.top_logprobs.append(dict(zip(top_strings, (p for _, p in lp.top))) if lp.top else None)
            result.text_offset.append(self.text_offset[index])
            self.text_offset[index] += len(token)
        return result


class ChatFormatter(_Formatter):
    def __init__(self, tokenizer, request_id: str, model: str, *, include_usage: bool = False, n: int = 1,
                 tokens_as_ids: bool = False):
        super().__init__(tokenizer, request_id, model, include_usage, n, num_choices=n, tokens_as_ids=tokens_as_ids)
        self.sent_role: set[int] = set()

    def events(self, out: RequestOutput) -> list[BaseModel]:
        events: list[BaseModel] = []
        index = out.index
        if index not in self.sent_role:
            self.sent_role.add(index)
            events.append(self._chunk(index, ChatDelta(role="assistant", content="")))
        logprobs = self._logprobs(out.logprobs) if out.logprobs is not None else None
        if out.text or logprobs:
            events.append(self._chunk(index, ChatDelta(content=out.text), logprobs=logprobs))
        if out.finished:
            events.append(self._chunk(index, ChatDelta(), finish_reason=out.finish_reason))
        if self._note_final(out) and self.include_usage:
            events.append(ChatCompletionChunk(id=self.request_id, model=self.model, choices=[],
                                              usage=self.usage(list(self.finals.values()))))
        return events

    def response(self, outputs: list[RequestOutput]) -> ChatCompletionResponse:
        choices = []
        for index, outs in self.by_choice(outputs).items():
            logprobs = None
            if any(out.logprobs is not None for out in outs):
                logprobs = ChatLogprobs(content=[entry for out in outs if out.logprobs
                                                 for entry in self._logprobs(out.logprobs).content])
            choices.append(ChatChoice(index=index, message=ChatMessageOut(content="".join(o.text for o in outs)),
                                      logprobs=logprobs, finish_reason=outs[-1].finish_reason))
        finals = [outs[-1] for outs in self.by_choice(outputs).values()]
        return ChatCompletionResponse(id=self.request_id, model=self.model, choices=choices,
                                      usage=self.usage(finals))

    def _chunk(self, index: int, delta: ChatDelta, *, logprobs: ChatLogprobs | None = None,
               finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice])

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        sampled, tops = self._token_strings(logprobs)
        return ChatLogprobs(content=[
            ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()),
                             top_logprobs=[TopLogprob(token=s, logprob=p, bytes=list(s.encode()))
                                           for s, (_, p) in zip(top_strings, lp.top)])
            for lp, token, top_strings in zip(logprobs, sampled, tops)])
