"""Per-request sampling parameters. Bad user input raises ValueError with the offending field."""
from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1
