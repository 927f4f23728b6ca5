"""Prefix tuning, prompt tuning and P-tuning on the running model: each adapter's virtual tokens become K/V in
read-only KV blocks written once at install (server.kv_blocks.SharedPrefix), shared by all its requests.

A request of such an adapter starts its block table with those blocks (BlockManager.allocate attaches them, one
reference each, also on re-admission after preemption); its own tokens follow from the next block, at
positions n, n+1, ... . So attention needs no special case and a step costs only the extra key columns.

- Prefix tuning: the checkpoint holds every layer's keys/values (no RoPE, as PEFT feeds them to the cache);
  they are copied into the blocks.
- Prompt tuning / P-tuning: the virtual tokens are input embeddings at positions 0..n-1. Attention is causal,
  so their K/V in every layer depend on nothing after them: the same for every request. Install runs the model
  once on the n embeddings, writing their K/V into the blocks, exactly what PEFT's prefill computes for them.

Install runs the model and writes the KV cache: call it between engine steps (on the engine's thread).
"""
from __future__ import annotations

import torch

from adapters.config import P_TUNING, PREFIX_TUNING, PROMPT_TUNING, AdapterError
from adapters.prompt import PrefixKV, VirtualTokens
from server.batch import BatchMeta
from server.kv_blocks import BlockManager, SharedPrefix
from server.runner import AttnMember, ModelRunner

KINDS = (PREFIX_TUNING, PROMPT_TUNING, P_TUNING)


def num_virtual_tokens(handle) -> int:
    """Virtual tokens a request for `handle` (None = the base model) has before its own tokens."""
    if handle is None or handle.kind not in KINDS:
        return 0
    return handle.info["num_virtual_tokens"]       # the registry keeps it while the weights are on disk


class PrefixRuntime:
    """Slot -> the adapter's SharedPrefix. Its blocks count against the KV budget once, until removal."""
    kind = "prefix"
    # The registry installs these adapters at load and never evicts them (adapters/registry.py). Eviction would
    # work too: a sequence looks its prefix up at each admission, and blocks_needed counts an uninstalled
    # prefix's blocks (tests/test_prompt_adapters.py::test_prefix_adapters_survive_eviction).
    evictable = False

    def __init__(self, runner: ModelRunner, blocks: BlockManager):
        self.runner = runner
        self.blocks = blocks
        self.prefixes: dict[int, SharedPrefix] = {}

    def install(self, slot: int, weights: PrefixKV | VirtualTokens) -> None:
        n = weights.num_virtual_tokens
        try:
            prefix = self.blocks.allocate_prefix(n)
        except RuntimeError as e:
            raise AdapterError(f"no room in the KV cache for the adapter's {n} virtual tokens ({e}); "
                               f"retry when running requests have finished, or raise --kv-cache-memory") from None
        try:
            if isinstance(weights, PrefixKV):
                self._copy_kv(prefix, weights)
            else:
                self._prefill(prefix, weights.embeddings)
        except BaseException:
            self.blocks.free_prefix(prefix)
            raise
        self.prefixes[slot] = prefix

    def remove(self, slot: int) -> None:
        """Drop the adapter's reference to its blocks (sequences still holding them keep them until freed)."""
        prefix = self.prefixes.pop(slot, None)
        if prefix is not None:
            self.blocks.free_prefix(prefix)

    def prefix_of(self, handle) -> SharedPrefix | None:
        """The shared prefix of adapter `handle` (a request using it starts its block table with it); None
        while the adapter is not installed (or has no virtual tokens)."""
        if handle is None or handle.kind not in KINDS or handle.slot is None:
            return None
        return self.prefixes.get(handle.slot)

    def step_view(self, layout) -> None:
        """Nothing per step: the prefix is in each request's block table and attention masks (server/runner)."""
        return None

    def _slots(self, prefix: SharedPrefix) -> torch.Tensor:
        """Flat KV-cache rows of the n virtual tokens (right-aligned in the prefix blocks)."""
        bs = prefix.block_size
        slots = [prefix.blocks[s // bs] * bs + s % bs for s in range(prefix.pad, prefix.pad + prefix.num_tokens)]
        return torch.tensor(slots, dtype=torch.long, device=self.runner.device)

    def _copy_kv(self, prefix: SharedPrefix, weights: PrefixKV) -> None:
        kv, slots = self.runner.kv, self._slots(prefix)
        for layer, (k, v) in enumerate(zip(weights.key, weights.value)):
            for cache, x in ((kv.k[layer], k), (kv.v[layer], v)):
                cache.view(-1, *x.shape[1:]).index_copy_(0, slots, x.to(cache.dtype).to(cache.device))

    @torch.inference_mode()
    def _prefill(self, prefix: SharedPrefix, embeddings: torch.Tensor) -> None:
        """One forward over the virtual tokens alone; attention writes their K/V into the prefix blocks."""
        runner, n = self.runner, prefix.num_tokens
        device = runner.device
        member = AttnMember(row=0, num_queries=n, first_slot=prefix.pad, block_table=list(prefix.blocks),
                            pad=prefix.pad)
        meta = BatchMeta(
            input_ids=torch.zeros(n, dtype=torch.long, device=device),
            positions=torch.arange(n, device=device),
            slot_mapping=self._slots(prefix),
            attn_groups=[runner.attn_group([member])],
            sample_index=torch.tensor([n - 1], device=device),
            inputs_embeds=embeddings.to(device=device, dtype=runner.model.embed_tokens.weight.dtype),
        )
        runner.model(meta, runner.kv)
