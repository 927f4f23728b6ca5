"""Per-request gates (UniPELT, AdapterHub `use_gating`), taken over the prompt at prefill and kept for decoding.

AdapterHub gates a module's contribution by  g = mean over the sequence of sigmoid(x @ W.T + b)  ([heads] values
per sequence; x the gate's input in that layer). The mean runs over the whole sequence, so in AdapterHub a token's
output depends on the tokens after it, and every generated token changes the gates of the whole sequence: no
KV-cached server can reproduce AdapterHub's generation. We serve the gate as taken over the prompt:

    at the request's first prefill (its whole prompt in one chunk: the scheduler sees to it, Sequence.whole_prompt),
    each gated module computes g from its prompt rows, uses it for them, and stores it in the request's adapter
    state (adapters.interface.StepItem.state); every later step of the request (decodes, a recompute after
    preemption, its forked samples) uses the stored g.

So the logits of the prompt's last position (the first generated token) equal AdapterHub's forward on the prompt
exactly; later tokens use the prompt's gates where AdapterHub would re-average over the grown sequence. A request
whose g is stored needs nothing but its own rows, so it batches with anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from adapters.interface import StepLayout


@dataclass
class GatedRequest:
    """One request of a gated adapter in this step: its flat rows and its stored gates."""
    rows: slice
    slot: int
    first_layer: int            # AdapterDrop: no gate (no adapter) in layers below
    start: int                  # tokens computed before this step (0 at the prefill that takes the gates)
    gates: dict                 # key (layer, module, ...) -> g [heads], kept in the sequence's adapter state


def gated_requests(layout: StepLayout, runtime_name: str, slots: set[int]) -> list[GatedRequest]:
    """This step's requests whose adapter's slot is in `slots` (those with gates)."""
    out = []
    for item in layout.items:
        adapter = item.adapter
        if adapter is None or adapter.slot not in slots:
            continue
        assert item.state is not None, "a gated adapter's request needs its sequence's adapter state"
        gates = item.state.setdefault(runtime_name, {})
        out.append(GatedRequest(slice(item.row, item.row + item.num_tokens), adapter.slot, item.first_layer,
                                item.start, gates))
    return out


def request_gate(x_rows: torch.Tensor, request: GatedRequest, key, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """The request's g [heads] for gate `key`: stored, or taken now over x_rows [N, in] (the gate's input on
    the request's rows: its whole prompt, at its first prefill)."""
    g = request.gates.get(key)
    if g is None:
        if request.start != 0:
            raise RuntimeError(f"gate {key} of a request is missing after its first prefill")
        logits = x_rows.float() @ weight.float().T + bias.float()
        g = request.gates[key] = torch.sigmoid(logits).mean(dim=0).to(x_rows.dtype)
    return g


def gate_rows(x: torch.Tensor, requests: list[GatedRequest], layer: int, key,
              gate_of: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor | None:
    """Per row of x [T, in]: its request's g for `key` ([T, heads]; 1 on rows of other requests), or None when
    no request of this step has that gate. gate_of(slot) -> (weight [heads, in], bias [heads]) or None."""
    col = None
    for request in requests:
        if request.first_layer > layer:
            continue
        gate = gate_of(request.slot)
        if gate is None:
            continue
        g = request_gate(x[request.rows], request, key, *gate)
        if col is None:
            col = x.new_ones(x.shape[0], g.shape[0])
        col[request.rows] = g
    return col
