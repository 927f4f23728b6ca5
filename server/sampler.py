"""Pick the next token of each sampled row with that request's own parameters and random generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.outputs import TokenLogprob
from server.sampling import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]      # per row; None where the request needs no logprobs


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           logprob_logits: torch.Tensor | None = None) -> SampleResult:
    """logits: [S, V] float32, row i belongs to a request with params[i] and generators[i]. `logprob_logits`:
    the model's logits before constraints (grammar masks) for the reported logprobs; default `logits`.

    Greedy rows take the argmax. Other rows: logits / temperature, then top-k, then top-p (nucleus),
    then one draw from the request's own generator, so a seeded request gives the same tokens whatever
    else is in the batch. Reported logprobs are those of `logprob_logits` (the engine passes the penalized
    logits: after server/penalties.py, before grammar masks and temperature), for rows whose params want them.
    """
    # argmax's first maximum: the decode kernel's (kernels/decode_layers.py), found while the logits were in its
    # threads' caches, when these are its logits unchanged (penalties and grammar masks make new tensors); else
    # max(dim).indices (3x faster than argmax over a vocabulary)
    greedy = getattr(logits, "row_argmax", None)
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy is None:
        tokens = logits.max(dim=-1).indices
    else:
        tokens = greedy.clone() if random_rows else greedy      # the kernel's own tensor, written below only if so
    if random_rows:
        rows = torch.tensor(random_rows)
        sub = logits[rows] / torch.tensor([params[i].temperature for i in random_rows])[:, None]
        sub = _top_k_top_p(sub, [params[i].top_k for i in random_rows], [params[i].top_p for i in random_rows])
        probs = sub.softmax(dim=-1)
        for j, i in enumerate(random_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    token_ids = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.wants_logprob]
    if want:
        source = logits if logprob_logits is None else logprob_logits
        lp = source[torch.tensor(want)].log_softmax(dim=-1)
        k = max(params[i].logprobs or 0 for i in want)
        top_vals, top_ids = lp.topk(max(k, 1), dim=-1)
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            top = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
            logprobs[i] = TokenLogprob(token_ids[i], lp[j, token_ids[i]].item(), top)
    return SampleResult(token_ids, logprobs)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k])[:, None]
    remove = ranks >= k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs                   # mass strictly before each token
    remove |= cum_before > torch.tensor(top_p)[:, None]          # the first token always stays
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
