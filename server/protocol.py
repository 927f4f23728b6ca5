"""OpenAI request and response bodies (the subset peftserve serves), and the translation to SamplingParams
(engine outputs -> these bodies: server/formatters.py).

Unknown request fields are ignored, as OpenAI clients send fields a server may not know; fields we know but
don't support (suffix) are rejected with a ParamError naming them.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer, model_validator

from server.guided import GuidedSpec, guided_spec
from server.mixtures import MergedAdapters
from server.sampling import (MAX_LOGIT_BIAS, MAX_SAMPLES, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, ParamError,
                             SamplingParams)

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128           # prompts x samples (best_of, else n) in one request


# ---- requests ------------------------------------------------------------------------------------------------
# The limits SamplingParams enforces, stated in the schema (a value outside them is a 400 naming the field).
MAX_STOP = 4
MAX_INT32 = 2**31 - 1
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1          # what torch.Generator.manual_seed takes


def _utf8(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"); they are not text, and tokenizers refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string is not valid Unicode text (lone surrogate at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT32)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": true}} (structured output, server/guided.py)."""
    model_config = ConfigDict(extra="ignore")
    type: str
    json_schema: dict | None = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: NonEmptyText
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False,
                                      description=f"0 (or below {MIN_TEMPERATURE}): greedy")
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=MAX_INT32, description="extension; 0 disables it")
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = Field(default=None, description="only with stream=true")
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES, description=f"samples per prompt; prompts x n (x best_of) "
                                                                  f"<= {MAX_CHOICES}")
    ignore_eos: bool = False                      # extension
    adapter_id: NonEmptyText | None = Field(default=None, description="extension (LoRAX): the adapter to use, "
                                                                       "whatever `model` says")
    adapter_drop: int | None = Field(default=None, ge=0, le=MAX_INT32,
                                     description="extension: skip the adapter in decoder layers below this one")
    merged_adapters: MergedAdapters | None = Field(default=None, description="extension (LoRAX): a mixture of "
                                                   "LoRA adapters to use, whatever `model` says")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False,
                                           description="logit -= (count > 0) * presence_penalty, count over "
                                                       "generated tokens")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False,
                                            description="logit -= count * frequency_penalty")
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2, allow_inf_nan=False,
                                             description="extension (vLLM): transformers' repetition penalty over "
                                                         "prompt + generated tokens; 1 = off")
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias added to its logit")
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_INT32,
                                   description="extension (vLLM): EOS and stop_token_ids are masked until this "
                                               "many tokens are generated")
    return_tokens_as_token_ids: bool = Field(default=False, description="extension (vLLM): logprobs name "
                                                                         "tokens as 'token_id:<id>'")
    user: Text | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict | bool | str | None = Field(default=None, description="vLLM extension: a JSON schema the "
                                                                           "output must match")
    guided_regex: Text | None = Field(default=None, description="vLLM extension: a regular expression")
    guided_choice: list[Text] | None = Field(default=None, description="vLLM extension: the output is one of these")
    guided_grammar: Text | None = Field(default=None, description="vLLM extension: a Lark grammar (rule `start`) "
                                                                 "or GBNF (rule `root`)")

    def guided_spec(self) -> GuidedSpec | None:
        """The structured-output constraint the request asks for (ParamError for conflicting ones)."""
        return guided_spec(self.response_format.model_dump() if self.response_format else None,
                           self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise ParamError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
            if token < 0:
                raise ParamError(f"logit_bias keys must be token ids (>= 0), got {key!r}", "logit_bias")
            bias[token] = value
        return bias

    def _sampling_params(self, max_tokens: int, logprobs: int | None, best_of: int | None = None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options is only allowed with stream=true", "stream_options")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=[] if self.stop is None else self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            guided=self.guided_spec(),
            n=self.n,
            best_of=best_of,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens or 0,
        )


class CompletionRequest(_GenerationRequest):
    prompt: (NonEmptyText | TokenIds | Annotated[list[NonEmptyText], Field(min_length=1)]
             | Annotated[list[TokenIds], Field(min_length=1)]) = Field(
        description="text, token ids, or a list of either (one choice per prompt and sample: index = "
                    "prompt_index * n + sample_index)")
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_INT32)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="not with echo")
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_SAMPLES,
                                description="samples generated per prompt (>= n); the n with the highest "
                                            "cumulative logprob are returned; not with stream")
    suffix: str | None = Field(default=None, max_length=0, description="not supported")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or token ids."""
        prompt = self.prompt
        prompts = prompt if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else [prompt]
        samples = self.best_of or self.n
        if len(prompts) * samples > MAX_CHOICES:
            raise ParamError(f"at most {MAX_CHOICES} prompts x samples per request, got {len(prompts)} prompts x "
                             f"{samples} ({'best_of' if self.best_of else 'n'})",
                             "prompt" if samples == 1 else "best_of" if self.best_of else "n")
        return prompts

    def sampling_params(self) -> SamplingParams:
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError(f"best_of must be >= n, got best_of={self.best_of}, n={self.n}", "best_of")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ParamError("best_of > n is not supported with stream=true", "best_of")
        if self.suffix:
            raise ParamError("suffix is not supported", "suffix")
        if self.echo and self.logprobs is not None:
            raise ParamError("echo with logprobs is not supported (no prompt logprobs)", "echo")
        return self._sampling_params(16 if self.max_tokens is None else self.max_tokens, self.logprobs,
                                     self.best_of if self.best_of is not None and self.best_of > self.n else None)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")      # name, tool_call_id, ... pass through to the template

    role: NonEmptyText
    content: Text | list[TextPart] | None = None

    @model_validator(mode="after")
    def _extras_are_text(self):
        for value in (self.model_extra or {}).values():
            _check_strings(value)
        return self

    def template_dict(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        message.setdefault("content", "")
        return message


def _check_strings(value) -> None:
    """_utf8 on every string inside a JSON value."""
    if isinstance(value, str):
        _utf8(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs=true")

    def sampling_params(self, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """Without max_(completion_)tokens the reply may use the rest of the context."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is None:
            if num_prompt_tokens >= max_model_len:
                raise ParamError(f"This model's maximum context length is {max_model_len} tokens; the messages "
                                 f"have {num_prompt_tokens} tokens", "messages")
            max_tokens = max_model_len - num_prompt_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs requires logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs)
        except ParamError as exc:               # name the chat field, not SamplingParams'
            renamed = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"
                       if self.max_completion_tokens is not None else "max_tokens"}
            raise ParamError(str(exc), renamed.get(exc.param, exc.param)) from None


# ---- responses -----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """Legacy completions shape: parallel lists, one entry per sampled token."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """Unset fields are left out, as OpenAI does: `{"role": "assistant", "content": ""}`, `{"content": "Hi"}`, `{}`."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "peftserve"
    parent: str | None = None
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str                                   # "ok", or why not (503)
