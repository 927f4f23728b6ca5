"""One sample of a request as the engine tracks it (`RequestState`), its seed, and sampling a step's rows:
penalties, then the grammar masks, then the sampler; if the batch raises, each row is sampled alone and only the
rows that raise fail."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from server.detokenizer import Detokenizer
from server.guided_decoding import GuidedDecoding, StepMasks
from server.penalties import apply_penalties
from server.sampler import sample
from server.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    """One sample of a request (n = 1: the request). Its sequence's key in `requests` is `seq.request_id`:
    the request's id for sample 0, `id#i` for sample i."""
    seq: Sequence
    detok: Detokenizer
    generator: torch.Generator
    request_id: str
    seed: int                               # the request's (its samples' seeds derive from it)
    index: int = 0                          # which of the request's samples
    queue_seconds: float | None = None      # from add_request to its first scheduled step
    cumulative_logprob: float = 0.0         # of its sampled tokens (best_of ranks samples by it)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`: sample 0 gets `seed` itself (so n=1 and the
    first of n samples agree), the others a value derived from (seed, index)."""
    return seed if index == 0 else random.Random(f"{seed}/{index}").getrandbits(63)

def sample_key(request_id: str, index: int) -> str:
    """The key of sample `index` of a request in the engine's `requests`: the request id for sample 0."""
    return request_id if index == 0 else f"{request_id}#{index}"


def sample_states(logits: torch.Tensor, states: list[RequestState], guided: GuidedDecoding, masks: StepMasks | None,
              eos_token_ids) -> list[tuple | Exception]:
    """(token, logprob) per state, or the exception its sampling raised (the batch is sampled row by row
    then: each row only depends on its own parameters and generator). `masks`: this step's grammar masks,
    applied after the penalties to what is sampled from (logprobs: the penalized logits, unmasked)."""
    try:
        penalized = _penalize(logits, states, eos_token_ids)
        allowed = guided.apply(masks, penalized, [s.seq.request_id for s in states])
        result = sample(allowed, [s.seq.params for s in states], [s.generator for s in states], penalized)
        return list(zip(result.token_ids, result.logprobs))
    except Exception:
        log.warning("batched sampling failed; sampling row by row", exc_info=True)
    samples = []
    for i, state in enumerate(states):
        try:
            penalized = _penalize(logits[i:i + 1], [state], eos_token_ids)
            allowed = guided.apply(masks, penalized, [state.seq.request_id])
            result = sample(allowed, [state.seq.params], [state.generator], penalized)
            samples.append((result.token_ids[0], result.logprobs[0]))
        except Exception as exc:
            log.exception("request %s failed in sampling", state.seq.request_id)
            samples.append(exc)
    return samples

def _penalize(logits: torch.Tensor, states: list[RequestState], eos_token_ids) -> torch.Tensor:
    seqs = [state.seq for state in states]
    return apply_penalties(logits, [seq.params for seq in seqs], [seq.prompt_ids for seq in seqs],
                           [seq.output_ids for seq in seqs], eos_token_ids)
