"""Per-step batch metadata: built once per engine step by the runner, passed explicitly to every layer.

Worked example (block_size 4). Sequence A decodes its 7th token, sequence B prefills a 3-token prompt:
    input_ids    = [a6, b0, b1, b2]              flat tokens, T = 4
    positions    = [6, 0, 1, 2]
    slot_mapping = [A.blocks[1]*4+2, B.blocks[0]*4+0, +1, +2]   where each token's K/V is written
    attn_groups  = [decode group: token_index [[0]], block_tables [[A0, A1]], mask [1,1,1,8] (keys 0..6),
                    prefill group: token_index [[1,2,3]], block_tables [[B0]], mask [1,1,3,4] (causal)]
    sample_index = [0, 3]                        rows whose logits are sampled
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters.interface import StepHooks


@dataclass
class AttnGroup:
    """Sequences attended together with one SDPA call (decodes: Q = 1; prefill chunks: Q = longest chunk).

    token_index:  [B, Q] long, flat rows holding each sequence's queries; padding repeats a real row
    out_index:    [N] long, flat rows receiving the outputs of the real (unpadded) queries, in [B, Q] order
    valid:        [B * Q] bool, which padded slots are real queries; None when none are padding
    block_tables: [B, NB] long, physical KV blocks of each sequence (padded with block 0, masked); a sequence
                  with a shared prefix (server.kv_blocks.SharedPrefix) starts with the prefix's blocks
    masks:        {window: [B, 1, Q, NB * block_size] bool, True = attend}; window None = full causal
    first_row:    set when token_index is exactly rows first_row .. first_row + B * Q - 1 in order (no padding,
                  e.g. a decode-only step): the queries are a view of the flat rows, nothing gathered
    """
    token_index: torch.Tensor
    out_index: torch.Tensor
    valid: torch.Tensor | None
    block_tables: torch.Tensor
    masks: dict[int | None, torch.Tensor]
    first_row: int | None = None


@dataclass
class BatchMeta:
    input_ids: torch.Tensor                # [T] long
    positions: torch.Tensor                # [T] long
    slot_mapping: torch.Tensor             # [T] long, block * block_size + offset
    attn_groups: list[AttnGroup]
    sample_index: torch.Tensor             # [S] long, rows whose logits are wanted
    adapters: dict = field(default_factory=dict)   # runtime name -> its per-step view (LoRA segments, ...)
    hooks: StepHooks = field(default_factory=StepHooks)   # the hooks of the runtimes with a view this step
    inputs_embeds: torch.Tensor | None = None      # [T, hidden]: embeddings given instead of input_ids' rows
    # AdapterDrop of shared prefixes: per decoder layer its groups (below a request's first adapter layer, its
    # block table there skips its prefix blocks); None = attn_groups in every layer
    layer_attn_groups: list[list[AttnGroup]] | None = None
    max_position: int | None = None                # max(positions), when the builder knows it (else computed)

    def groups(self, layer: int) -> list[AttnGroup]:
        return self.attn_groups if self.layer_attn_groups is None else self.layer_attn_groups[layer]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()
