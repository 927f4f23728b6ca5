"""Prefix tuning, prompt tuning and P-tuning: each adapter's virtual tokens, handed to the engine as data
(`virtual_kv`), which writes them once into read-only KV blocks shared by all the adapter's requests
(server/prefix_store.py).

A request of such an adapter starts its block table with those blocks; its own tokens follow from the next block,
at positions n, n+1, ... . So attention needs no special case and a step costs only the extra key columns.

- Prefix tuning: the checkpoint holds every layer's keys/values (no RoPE, as PEFT feeds them to the cache):
  `PrefixKV`, copied into the blocks.
- Prompt tuning / P-tuning: the virtual tokens are input embeddings at positions 0..n-1 (`VirtualTokens`).
  Attention is causal, so their K/V in every layer depend on nothing after them: the same for every request.
  The engine runs the model once on the n embeddings, exactly what PEFT's prefill computes for them.
Nothing here acts per step: the prefix is in each request's block table and attention masks.
"""
from __future__ import annotations

from adapters.config import P_TUNING, PREFIX_TUNING, PROMPT_TUNING
from adapters.interface import AdapterRuntime, PrefixKV, VirtualTokens

KINDS = (PREFIX_TUNING, PROMPT_TUNING, P_TUNING)


class PrefixRuntime(AdapterRuntime):
    name = "prefix"
    kinds = KINDS
    # Installed at load and never evicted (adapters/registry.py): a request binds to its adapter's KV blocks
    # when it is added. Eviction would work too (a sequence looks its prefix up at each admission), and is
    # tested with this set to True (tests/test_prompt_adapters.py::test_prefix_adapters_survive_eviction).
    evictable = False

    def __init__(self, model):
        self.spec = model.spec

    def load(self, path: str) -> PrefixKV | VirtualTokens:
        from adapters.prompt import load_prompt_adapter
        return load_prompt_adapter(path, self.spec)

    def virtual_kv(self, weights: PrefixKV | VirtualTokens) -> PrefixKV | VirtualTokens:
        return weights
