"""KV-cache block accounting. Pure Python: which physical blocks hold which sequence's tokens.

A sequence's `block_table[i]` is the physical block holding its tokens `i*block_size .. (i+1)*block_size-1`.
Blocks carry a reference count so read-only blocks can be shared between sequences: a sequence with virtual
tokens (prefix / prompt tuning) starts its block table with its adapter's `SharedPrefix` blocks, taking one
reference each when it is (re-)admitted, then its own tokens from block `len(prefix.blocks)` on. A block returns
to the free list when its count drops to zero; the adapter holds one reference to its prefix blocks while it is
installed, so a prefix outlives neither its adapter nor its last sequence.

A sequence whose adapter takes values over its whole prompt (`seq.whole_prompt`: UniPELT's gated prefix scales
the prefix's keys and values per request) gets its own copies of the prefix blocks at each (re-)admission, copied
like copy-on-write blocks before its first step; the adapter's runtime rescales them at that step.

The `n` samples of one prompt share its blocks too (`fork`): one prefill, then each sample's table points at the
same blocks. A sample's next token going into a block someone else still references gets a private copy first
(copy-on-write in `allocate`, at most one block: the prompt's last, partial one); the copies are queued as
(source, destination) pairs that the runner performs before the step's forward (`take_copies`).

With automatic prefix caching (server/prefix_cache.py), a sequence's full computed blocks are also entered in the
cache; a later sequence with the same leading tokens and adapter starts with them (`attach_cached`: one reference
each) instead of computing them. A cached block whose count drops to zero keeps its contents and counts as free;
it is handed out again (its entry dropped), least recently released first, only when no other free block is left.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from server.prefix_cache import PrefixCache
from server.sequence import Sequence
from server.shared_prefix import SharedPrefix


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        # the shared prefix of a sequence with virtual tokens, None while its adapter is not installed; looked up
        # at each admission (set by the engine: after an eviction the adapter may come back with other blocks)
        self.prefix_of: Callable[[Sequence], SharedPrefix | None] = lambda seq: None
        self.copies: list[tuple[int, int]] = []      # copy-on-write (src, dst) blocks not yet copied
        self.cache = PrefixCache(block_size) if prefix_caching else None

    @property
    def num_free(self) -> int:
        """Blocks nobody references: never-cached ones, and cached ones that may be evicted."""
        return len(self.free_blocks) + (len(self.cache.evictable) if self.cache is not None else 0)

    @property
    def num_cached_free(self) -> int:
        return len(self.cache.evictable) if self.cache is not None else 0

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra free blocks `seq` needs so that its computed tokens plus `num_new_tokens` fit. A shared prefix
        needs none, except before admission while its adapter is not installed (installing takes them)."""
        own = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        if seq.block_table:
            copy = self._shared_write_block(seq) is not None
            return max(0, own + seq.num_prefix_blocks - len(seq.block_table)) + copy
        if seq.num_virtual_tokens:         # installing the prefix takes its blocks; a private copy as many again
            prefix = cdiv(seq.num_virtual_tokens, self.block_size)
            return own + prefix * ((self.prefix_of(seq) is None) + seq.whole_prompt)
        return own

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def attach_cached(self, seq: Sequence) -> int:
        """Before admission: start `seq` (no blocks yet) with the cached blocks of its longest cached prefix, one
        reference each, counting their tokens as computed. Returns those tokens (0 without prefix caching).
        `free(seq)` undoes it (and resets nothing else: the caller sets num_computed_tokens back to 0)."""
        if self.cache is None or seq.block_table or seq.num_computed_tokens:
            return 0
        blocks, chain = self.cache.lookup(seq)
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.cache.evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)
        seq.cached_chain = list(chain)
        seq.num_computed_tokens = len(blocks) * self.block_size
        return seq.num_computed_tokens

    def cache_computed(self, seq: Sequence) -> None:
        """Enter `seq`'s blocks that its last step filled into the prefix cache (after the step's forward)."""
        if self.cache is not None:
            self.cache.register(seq, seq.block_table[seq.num_prefix_blocks:])

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"KV cache: need {needed} blocks, {self.num_free} free")
        if not seq.block_table and seq.num_virtual_tokens:     # (re-)admission: attach the shared prefix
            prefix = self.prefix_of(seq)
            assert prefix is not None, "the adapter must be installed before its sequence is admitted"
            assert prefix.num_tokens == seq.num_virtual_tokens and prefix.block_size == self.block_size
            for block in prefix.blocks:
                assert self.ref_counts[block] > 0, "prefix blocks are held by their adapter"
                self.ref_counts[block] += 1
            seq.prefix = prefix
            seq.block_table.extend(prefix.blocks)
            if seq.whole_prompt:            # its own copy of the prefix blocks (a gated prefix scales them)
                for i, block in enumerate(prefix.blocks):
                    seq.block_table[i] = self._take_free()
                    self.ref_counts[block] -= 1
                    self.copies.append((block, seq.block_table[i]))
                needed -= len(prefix.blocks)
        shared = self._shared_write_block(seq)
        if shared is not None:                                   # copy-on-write
            block = self._take_free()
            old = seq.block_table[shared]
            self.ref_counts[old] -= 1                            # others still hold it
            seq.block_table[shared] = block
            self.copies.append((old, block))
            needed -= 1
        for _ in range(needed):
            seq.block_table.append(self._take_free())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (same tokens as `parent`, nothing in its table yet) shares every block of `parent`'s table:
        one more reference each, no new block. Its first write into a shared block copies that block first."""
        assert not child.block_table and child.all_ids == parent.all_ids
        for block in parent.block_table:
            assert self.ref_counts[block] > 0
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.prefix = parent.prefix
        child.cached_chain = list(parent.cached_chain)

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write (source, destination) block pairs queued since the last call, in order."""
        copies, self.copies = self.copies, []
        return copies

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in `seq.block_table` of the block its next token goes to, if other sequences hold it too."""
        index = seq.num_prefix_blocks + seq.num_computed_tokens // self.block_size
        if index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1:
            return index
        return None

    def _take_free(self) -> int:
        """A free block with one reference: a never-cached one if any, else the least recently released cached
        one (its cache entry dropped)."""
        block = self.free_blocks.popleft() if self.free_blocks else self.cache.evict()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s reference to every block of its table (its own blocks return to the free list; shared
        prefix blocks stay with their adapter)."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.prefix = None
        seq.cached_chain = []

    def allocate_prefix(self, num_tokens: int) -> SharedPrefix:
        """Blocks for `num_tokens` read-only virtual tokens, held (one reference) until `free_prefix`."""
        needed = cdiv(num_tokens, self.block_size)
        if needed > self.num_free:
            raise RuntimeError(f"KV cache: {num_tokens} virtual tokens need {needed} blocks, "
                               f"{self.num_free} free")
        blocks = tuple(self._take_free() for _ in range(needed))
        return SharedPrefix(blocks, num_tokens, self.block_size)

    def free_prefix(self, prefix: SharedPrefix) -> None:
        self._release(prefix.blocks)

    def _release(self, blocks) -> None:
        for block in blocks:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                if self.cache is not None and self.cache.is_cached(block):
                    self.cache.evictable[block] = None       # most recently released last
                else:
                    self.free_blocks.append(block)
