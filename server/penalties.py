"""Logits processing before sampling: logit_bias, min_tokens, repetition / frequency / presence penalties.

Applied to the step's sampled rows [S, V] before server/sampler.py::sample, vectorised over the rows that use
any of them (rows that use none cost nothing), in vLLM's order:
1. logit_bias:  logit[t] += bias[t]
2. min_tokens:  while fewer than min_tokens tokens are generated, EOS and stop_token_ids get -inf
3. repetition_penalty p (transformers' RepetitionPenaltyLogitsProcessor), over prompt + generated tokens:
                every token t that occurs: logit[t] = logit[t] * p if logit[t] < 0 else logit[t] / p
4. OpenAI's frequency / presence penalties, over generated tokens, with c[t] = times t was generated:
                logit[t] -= c[t] * frequency_penalty + (c[t] > 0) * presence_penalty
Token occurrences come from one scatter per kind over a padded [R, L] matrix of the rows' token ids
(padding = column V, dropped afterwards), not a loop over the vocabulary.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from server.sampling import SamplingParams


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: Seq[Seq[int]],
                    output_ids: Seq[Seq[int]], eos_token_ids: set[int]) -> torch.Tensor:
    """logits: [S, V] float32, row i of a request with params[i] whose tokens so far are prompt_ids[i] +
    output_ids[i]. Returns the processed logits (`logits` itself when no row uses any of this, else a copy)."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, rows_t)
    ps = [params[i] for i in rows]
    _logit_bias(sub, ps)
    _min_tokens(sub, ps, [len(output_ids[i]) for i in rows], eos_token_ids)
    rep = [j for j, p in enumerate(ps) if p.repetition_penalty != 1.0]
    if rep:
        seen = _occurs(sub.shape[1], [[*prompt_ids[rows[j]], *output_ids[rows[j]]] for j in rep], sub.device) > 0
        penalty = torch.tensor([ps[j].repetition_penalty for j in rep], device=sub.device)[:, None]
        rep_t = torch.tensor(rep, dtype=torch.long, device=sub.device)
        x = sub.index_select(0, rep_t)
        x = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
        sub.index_copy_(0, rep_t, x)
    freq = [j for j, p in enumerate(ps) if p.frequency_penalty or p.presence_penalty]
    if freq:
        counts = _occurs(sub.shape[1], [output_ids[rows[j]] for j in freq], sub.device)
        frequency = torch.tensor([ps[j].frequency_penalty for j in freq], device=sub.device)[:, None]
        presence = torch.tensor([ps[j].presence_penalty for j in freq], device=sub.device)[:, None]
        freq_t = torch.tensor(freq, dtype=torch.long, device=sub.device)
        x = sub.index_select(0, freq_t) - counts * frequency - (counts > 0).to(sub.dtype) * presence
        sub.index_copy_(0, freq_t, x)
    return logits.index_copy(0, rows_t, sub)


def _occurs(vocab: int, ids: list[Seq[int]], device) -> torch.Tensor:
    """[R, V] float: how many times each token occurs in each row's ids (one scatter_add)."""
    width = max((len(row) for row in ids), default=0)
    padded = torch.full((len(ids), max(width, 1)), vocab, dtype=torch.long, device=device)
    for r, row in enumerate(ids):
        if row:
            padded[r, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _logit_bias(sub: torch.Tensor, ps: list[SamplingParams]) -> None:
    r, t, v = [], [], []
    for j, p in enumerate(ps):
        for token, bias in p.logit_bias.items():
            r.append(j)
            t.append(token)
            v.append(bias)
    if r:
        index = (torch.tensor(r, device=sub.device), torch.tensor(t, device=sub.device))
        sub.index_put_(index, torch.tensor(v, dtype=sub.dtype, device=sub.device), accumulate=True)


def _min_tokens(sub: torch.Tensor, ps: list[SamplingParams], num_generated: list[int],
                eos_token_ids: set[int]) -> None:
    r, t = [], []
    for j, (p, n) in enumerate(zip(ps, num_generated)):
        if n < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
            for token in sorted(stops):
                if token < sub.shape[1]:
                    r.append(j)
                    t.append(token)
    if r:
        sub[torch.tensor(r, device=sub.device), torch.tensor(t, device=sub.device)] = float("-inf")
