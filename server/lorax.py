"""LoRAX's generate API (TGI's, plus adapters): request and response bodies, and the formatter from engine outputs.

Shapes follow LoRAX's Python client (predibase/lorax clients/python/lorax/types.py) and router: POST /generate
answers `{"generated_text", "details"?}`, POST /generate_stream sends server-sent events `data: <StreamResponse>`,
one per generated token, the last one with `generated_text` (and `details` when asked for), no `[DONE]`.
Errors on these routes are LoRAX's `{"error": message, "error_type": ...}` with the usual status codes.
"""
from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.step_sampling import sample_seed
from server.middleware import LORAX_ROUTES  # noqa: F401  (re-exported: the routes served here)
from server.mixtures import MergedAdapters
from server.outputs import RequestOutput
from server.protocol import MAX_INT32, MAX_STOP, MAX_TOP_LOGPROBS, NonEmptyText, Text
from server.sampling import MAX_SAMPLES, MIN_REPETITION_PENALTY, ParamError, SamplingParams

ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")      # LoRAX's; only "local" is served here
MAX_LORAX_SEED = 2**63 - 1


# ---- requests ------------------------------------------------------------------------------------------------
class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: NonEmptyText | None = Field(default=None, description="a loaded adapter's name, or one under "
                                                                       "--adapter-dir (loaded just in time)")
    adapter_source: str | None = Field(default=None, description='"local" (or absent) only')
    merged_adapters: MergedAdapters | None = Field(default=None, description="a mixture of loaded LoRA adapters "
                                                                             "(not with adapter_id)")
    api_token: Text | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32, description="default: rest of the context")
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2, allow_inf_nan=False)
    return_full_text: bool = False
    stop: list[NonEmptyText] = Field(default_factory=list, max_length=MAX_STOP)
    seed: int | None = Field(default=None, ge=0, le=MAX_LORAX_SEED)
    temperature: float | None = Field(default=None, gt=0, le=2, allow_inf_nan=False)
    top_k: int | None = Field(default=None, gt=0, le=MAX_INT32)
    top_p: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False)
    truncate: int | None = Field(default=None, ge=1, le=MAX_INT32, description="keep the last N prompt tokens")
    typical_p: float | None = Field(default=None, gt=0, lt=1, description="not supported")
    best_of: int | None = Field(default=None, ge=1, le=MAX_SAMPLES, description="needs sampling, no seed, "
                                                                               "not with streaming")
    watermark: bool = Field(default=False, description="not supported")
    details: bool = False
    decoder_input_details: bool = Field(default=False, description="prompt tokens in details.prefill (their "
                                                                   "logprob is null: not computed)")
    return_k_alternatives: int | None = Field(default=None, ge=1, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = Field(default=None, description="not supported on /generate")

    @property
    def is_sampling(self) -> bool:
        """TGI's rule: sampling when do_sample or any warper is set (temperature != 1, top_k, top_p)."""
        return (self.do_sample or self.temperature not in (None, 1.0) or self.top_k is not None
                or self.top_p is not None)

    def check(self, stream: bool) -> None:
        if self.adapter_source not in (None, "local"):
            raise ParamError(f"adapter_source {self.adapter_source!r} is not supported: only 'local' adapters "
                             f"(loaded, or under --adapter-dir); LoRAX's sources are {list(ADAPTER_SOURCES)}",
                             "parameters.adapter_source")
        for name in ("typical_p", "response_format"):
            if getattr(self, name) is not None:
                raise ParamError(f"{name} is not supported", f"parameters.{name}")
        if self.watermark:
            raise ParamError("watermark is not supported", "parameters.watermark")
        if (self.best_of or 1) > 1:
            if stream:
                raise ParamError("best_of > 1 is not supported when streaming", "parameters.best_of")
            if self.seed is not None:
                raise ParamError("seed must not be set when best_of > 1", "parameters.seed")
            if not self.is_sampling:
                raise ParamError("best_of > 1 needs sampling (do_sample, temperature, top_k or top_p)",
                                 "parameters.best_of")
        if stream and self.decoder_input_details:
            raise ParamError("decoder_input_details is not supported when streaming", "parameters.decoder_input_details")

    def sampling_params(self, max_tokens: int, stream: bool) -> SamplingParams:
        sampling = self.is_sampling
        want_logprobs = stream or self.details
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=(1.0 if self.temperature is None else self.temperature) if sampling else 0.0,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=(self.seed if self.seed is not None else random.getrandbits(63)) if sampling else None,
            stop=list(self.stop),
            ignore_eos=self.ignore_eos_token,
            logprobs=(self.return_k_alternatives or 0) if want_logprobs else None,
            best_of=self.best_of if (self.best_of or 1) > 1 else None,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
        )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: NonEmptyText
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(default=False, description="ignored: /generate_stream streams")


# ---- responses ------------------------------------------------------------------------------------------------
FinishReasonName = Literal["length", "eos_token", "stop_sequence"]


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None
    skipped: bool = False


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReasonName
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class Details(BaseModel):
    finish_reason: FinishReasonName
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int = 0
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReasonName
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class LoraxError(BaseModel):
    error: str
    error_type: str


def lorax_error_type(status: int) -> str:
    return {503: "overloaded", 500: "generation"}.get(status, "validation")


# ---- engine outputs -> bodies ---------------------------------------------------------------------------------
class LoraxFormatter:
    """Builds /generate bodies and /generate_stream events from one request's RequestOutputs."""

    def __init__(self, tokenizer, eos_token_ids: set[int], prompt: str, prompt_ids: list[int],
                 params: GenerateParameters, sampling: SamplingParams):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.special_ids = set(tokenizer.all_special_ids)
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampling = sampling
        self.text = ""

    def seed(self, index: int) -> int | None:
        return None if self.sampling.seed is None else sample_seed(self.sampling.seed, index)

    def finish_reason(self, out: RequestOutput, last_token: int | None) -> FinishReasonName:
        if out.finish_reason == "length":
            return "length"
        return "eos_token" if last_token in self.eos_token_ids else "stop_sequence"

    def tokens(self, out: RequestOutput) -> list[Token]:
        """One Token per generated token of `out` (one per step): text is the output's text delta."""
        result = []
        for i, token_id in enumerate(out.token_ids):
            lp = out.logprobs[i] if out.logprobs else None
            alternatives = None
            if lp is not None and self.params.return_k_alternatives:
                names = self.tokenizer.batch_decode([[t] for t, _ in lp.top])
                alternatives = [AlternativeToken(id=t, text=name, logprob=p) for (t, p), name in zip(lp.top, names)]
            result.append(Token(id=token_id, text=out.text if i == len(out.token_ids) - 1 else "",
                                logprob=None if lp is None else lp.logprob, special=token_id in self.special_ids,
                                alternative_tokens=alternatives))
        return result

    def full_text(self, text: str) -> str:
        return self.prompt + text if self.params.return_full_text else text

    def events(self, out: RequestOutput) -> list[StreamResponse]:
        self.text += out.text
        tokens = self.tokens(out)
        if not tokens:
            return []
        event = StreamResponse(token=tokens[-1])
        if out.finished:
            event.generated_text = self.full_text(self.text)
            if self.params.details:
                event.details = StreamDetails(finish_reason=self.finish_reason(out, out.token_ids[-1]),
                                              prompt_tokens=out.num_prompt_tokens,
                                              generated_tokens=out.num_output_tokens, seed=self.seed(0))
        return [event]

    def response(self, outputs: list[RequestOutput]) -> GenerateResponse:
        by_sample: dict[int, list[RequestOutput]] = {}
        for out in outputs:
            by_sample.setdefault(out.index, []).append(out)
        finals = {index: outs[-1] for index, outs in by_sample.items()}
        best = max(finals, key=lambda i: finals[i].cumulative_logprob or 0.0) if len(finals) > 1 else 0
        text = "".join(out.text for out in by_sample[best])
        if not self.params.details:
            return GenerateResponse(generated_text=self.full_text(text))
        sequences = {index: self._sequence(index, outs) for index, outs in by_sample.items()}
        main = sequences.pop(best)
        prefill = []
        if self.params.decoder_input_details:
            names = self.tokenizer.batch_decode([[t] for t in self.prompt_ids])
            prefill = [InputToken(id=t, text=name) for t, name in zip(self.prompt_ids, names)]
        details = Details(finish_reason=main.finish_reason, prompt_tokens=len(self.prompt_ids),
                          generated_tokens=main.generated_tokens, seed=main.seed, prefill=prefill,
                          tokens=main.tokens,
                          best_of_sequences=[seq.model_copy(update={"prefill": prefill})
                                             for _, seq in sorted(sequences.items())] or None)
        return GenerateResponse(generated_text=self.full_text(text), details=details)

    def _sequence(self, index: int, outs: list[RequestOutput]) -> BestOfSequence:
        last = outs[-1]
        token_ids = [t for out in outs for t in out.token_ids]
        return BestOfSequence(generated_text=self.full_text("".join(out.text for out in outs)),
                              finish_reason=self.finish_reason(last, token_ids[-1] if token_ids else None),
                              generated_tokens=last.num_output_tokens, seed=self.seed(index),
                              tokens=[token for out in outs for token in self.tokens(out)])
