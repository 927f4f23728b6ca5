"""What the engine hands back to a caller for each request, once per step that produced something."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    # top alternatives at this position, best first: (token_id, logprob); len = SamplingParams.logprobs
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A delta: the tokens and text this step added to sample `index` of request `request_id`.

    `text` is held back while it could still be the start of a stop string, so concatenating every delta's
    `text` gives exactly the final completion text (stop string excluded). `finish_reason` is set on the last
    delta only: "stop" (EOS / stop token / stop string), "length" (max_tokens or context full), "abort".
    """
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    queue_seconds: float | None = None  # on a final output: from arrival at the engine to its first step
    error: Exception | None = None      # set on a final output when the request failed (e.g. its adapter's
                                        # checkpoint could not be read back from disk)
    index: int = 0                      # which sample of the request (n > 1: each sample finishes on its own)
    cumulative_logprob: float | None = None     # sum of its sampled tokens' logprobs so far


class RequestFailed(RuntimeError):
    """The engine raised while running this request (HTTP 500); the engine, and every other request, go on."""
