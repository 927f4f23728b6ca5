"""Automatic prefix caching: full KV blocks of earlier requests reused by later requests with the same leading
tokens and the same adapter. Pure Python (the block manager asks it; it never touches tensors).

A full block (block_size tokens whose K/V are all computed) is entered under the key
    (adapter identity, parent entry id, the block's tokens)
where the parent is the entry of the sequence's previous block (ROOT for its first block). The key holds the
tokens themselves and the parent's id, not hashes, so two keys are equal only when the whole token prefix and
the adapter are: a hit is exact by construction. Entry ids are never reused, so after a parent is evicted its
children can no longer be reached from ROOT, and a later entry in the parent's physical block cannot be
mistaken for it.

The adapter identity is (a number given to each adapter handle object, its AdapterDrop first layer): K/V depend
on both. Replacing an adapter (load_inplace) or unloading and loading it again makes a new handle, hence a new
number, so a reloaded adapter never hits blocks computed with the old weights. Requests with virtual tokens
(prefix / prompt tuning) are not cached: their virtual tokens already live in shared blocks, and their own
blocks follow an adapter-owned prefix whose blocks can change when the adapter is reinstalled. Nor are requests
whose adapter takes values over the whole prompt (`seq.whole_prompt`, UniPELT's gates): the K/V of their first
tokens depend on their later ones.

Worked example, block size 4, base model. Request A has tokens [5 6 7 8 | 9 10 11 12 | 13]: after its prefill
its two full blocks b3, b7 are entered as (base, ROOT, (5,6,7,8)) -> b3 (id 1) and (base, 1, (9,10,11,12)) -> b7
(id 2). Request B with tokens [5 6 7 8 | 9 10 11 12 | 40 41] then starts with b3, b7 in its table (one reference
each) and 8 tokens computed; only 40, 41 run. B's prompt were [5 6 7 8 | 9 10 11 12] exactly: it would reuse b3
only, since the last prompt token must run to give the logits of the first output token.

Blocks whose reference count drops to zero keep their entry and wait in LRU order (`evictable`); the block
manager counts them as free and takes them, oldest first, only when no never-cached block is left.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

ROOT = 0


class PrefixCache:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.entries: dict[tuple, int] = {}          # key -> physical block
        self.entry_of: dict[int, tuple[tuple, int]] = {}   # physical block -> (its key, its entry id)
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached blocks nobody references, LRU first
        self._ids = itertools.count(ROOT + 1)
        self._adapter_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._adapter_counter = itertools.count(1)
        self.num_queried_tokens = 0                  # prompt tokens looked up at admissions
        self.num_hit_tokens = 0                      # of which found in the cache
        self.num_evictions = 0                       # cached blocks handed out again for other contents

    def adapter_key(self, seq) -> tuple | None:
        """What besides the tokens decides the sequence's K/V; None = not cacheable."""
        if seq.num_virtual_tokens or seq.whole_prompt:
            return None
        if seq.adapter is None:
            return (0, 0)
        number = self._adapter_ids.get(seq.adapter)
        if number is None:
            number = self._adapter_ids[seq.adapter] = next(self._adapter_counter)
        return (number, seq.first_adapter_layer)

    def _key(self, adapter: tuple, parent: int, ids: list[int], index: int) -> tuple:
        bs = self.block_size
        return (adapter, parent, tuple(ids[index * bs:(index + 1) * bs]))

    def lookup(self, seq) -> tuple[list[int], list[int]]:
        """(blocks, entry ids) of the longest cached run of `seq`'s leading full blocks, leaving at least its last
        token to compute."""
        adapter = self.adapter_key(seq)
        if adapter is None:
            return [], []
        ids = seq.all_ids
        blocks, chain, parent = [], [], ROOT
        for index in range((len(ids) - 1) // self.block_size):
            block = self.entries.get(self._key(adapter, parent, ids, index))
            if block is None:
                break
            parent = self.entry_of[block][1]
            blocks.append(block)
            chain.append(parent)
        return blocks, chain

    def count(self, num_tokens: int, num_hit_tokens: int) -> None:
        """An admitted sequence of `num_tokens` tokens found `num_hit_tokens` of them in the cache."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def register(self, seq, own_table: list[int]) -> None:
        """Enter `seq`'s newly full, computed blocks (`own_table`: its block table after any shared prefix)."""
        adapter = self.adapter_key(seq)
        if adapter is None:
            return
        full = seq.num_computed_tokens // self.block_size
        chain = seq.cached_chain
        if len(chain) >= full:
            return
        ids = seq.all_ids
        for index in range(len(chain), full):
            key = self._key(adapter, chain[-1] if chain else ROOT, ids, index)
            existing = self.entries.get(key)
            if existing is not None:                 # computed by another sequence meanwhile: same contents
                chain.append(self.entry_of[existing][1])
                continue
            block = own_table[index]
            if block in self.entry_of:               # already an entry (cannot happen for a block being filled)
                chain.append(self.entry_of[block][1])
                continue
            entry = next(self._ids)
            self.entries[key] = block
            self.entry_of[block] = (key, entry)
            chain.append(entry)

    def evict(self) -> int:
        """Drop the least recently released cached block's entry; returns the block, now plain free."""
        block, _ = self.evictable.popitem(last=False)
        self.num_evictions += 1
        key, _ = self.entry_of.pop(block)
        del self.entries[key]
        return block

    def is_cached(self, block: int) -> bool:
        return block in self.entry_of
