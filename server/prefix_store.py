"""Adapters' virtual tokens in shared, read-only KV blocks: the engine side of `AdapterRuntime.virtual_kv`.

A runtime hands over its adapter's virtual tokens as data (adapters/interface.py): `PrefixKV` (every layer's K/V,
copied in) or `VirtualTokens` (input embeddings: one forward over them writes their K/V). The blocks come from
the engine's BlockManager and count against the KV budget once, until the adapter leaves its slot; a request of
the adapter starts its block table with them (BlockManager.allocate, via `prefix_of`).
"""
from __future__ import annotations

import torch

from adapters.config import AdapterError
from adapters.interface import AdapterRuntime, PrefixKV, VirtualTokens
from server.batch import BatchMeta
from server.kv_blocks import BlockManager
from server.runner import AttnMember, ModelRunner
from server.shared_prefix import SharedPrefix


class PrefixStore:
    """Slot -> the SharedPrefix of the adapter installed there. Install runs the model and writes the KV cache:
    call it between engine steps (on the engine's thread)."""

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
        while the adapter is not installed, or has no virtual tokens."""
        if handle is None or handle.slot is None:
            return None
        return self.prefixes.get(handle.slot)

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


class RuntimeSlots:
    """What the registry installs into a slot for one runtime's kinds: the runtime's own tensors, then its
    virtual tokens (if any) into shared KV blocks. `evictable` is the runtime's."""

    def __init__(self, runtime: AdapterRuntime, prefixes: PrefixStore):
        self.runtime = runtime
        self.prefixes = prefixes

    @property
    def evictable(self) -> bool:
        return self.runtime.evictable

    def install(self, slot: int, weights) -> None:
        self.runtime.install(slot, weights)
        kv = self.runtime.virtual_kv(weights)
        if kv is not None:
            self.prefixes.install(slot, kv)

    def remove(self, slot: int) -> None:
        self.prefixes.remove(slot)
        self.runtime.remove(slot)
