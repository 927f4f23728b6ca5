"""Per-request sampling parameters. Bad user input raises ValueError with the offending field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.guided import GuidedSpec

MAX_SAMPLES = 128          # n / best_of per prompt
MAX_LOGIT_BIAS = 300       # logit_bias entries (OpenAI's limit)
MIN_REPETITION_PENALTY = 0.01     # logits are divided by it: a tinier one overflows float32 to inf

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): logits / 1e-300 overflow float32 to inf, and
# any distribution this sharp is argmax already.
MIN_TEMPERATURE = 1e-5


class ParamError(ValueError):
    """A request parameter is invalid; `param` names it (OpenAI error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None         # number of top alternatives to report per token (0..20)
    n: int = 1                          # samples returned
    best_of: int | None = None          # samples generated (>= n; the n with the highest cumulative logprob win)
    presence_penalty: float = 0.0       # OpenAI: logit -= (count > 0) * presence, over generated tokens
    frequency_penalty: float = 0.0      # OpenAI: logit -= count * frequency, over generated tokens
    repetition_penalty: float = 1.0     # transformers / vLLM: over prompt + generated tokens (1 = off)
    logit_bias: dict[int, float] = field(default_factory=dict)    # token id -> added to its logit
    min_tokens: int = 0                 # EOS and stop_token_ids are masked until this many tokens
    guided: GuidedSpec | None = None    # structured output: what the output must match (server/guided.py)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ParamError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise ParamError(f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise ParamError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise ParamError("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ParamError(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_SAMPLES:
            raise ParamError(f"n must be in [1, {MAX_SAMPLES}], got {self.n!r}", "n")
        if self.best_of is not None and not self.n <= self.best_of <= MAX_SAMPLES:
            raise ParamError(f"best_of must be in [n, {MAX_SAMPLES}] (n={self.n}), got {self.best_of!r}", "best_of")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ParamError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0:
            raise ParamError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2], got "
                             f"{self.repetition_penalty}",
                             "repetition_penalty")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ParamError(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
                             "logit_bias")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise ParamError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}",
                                 "logit_bias")
            if not -100.0 <= bias <= 100.0:
                raise ParamError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}",
                                 "logit_bias")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}",
                             "min_tokens")

    @property
    def num_samples(self) -> int:
        """Samples generated for the prompt: best_of if set, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def wants_logprob(self) -> bool:
        """Whether the sampler computes its sampled tokens' logprobs (asked for, or to rank best_of samples)."""
        return self.logprobs is not None or self.num_samples > self.n

    @property
    def has_penalties(self) -> bool:
        """Whether server/penalties.py changes this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1
