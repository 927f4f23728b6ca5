"""An adapter's virtual tokens in read-only KV blocks. Pure Python; imported by the block manager and by
sequences (which hold one), so neither imports the other's module for it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class SharedPrefix:
    """Read-only KV blocks holding an adapter's `num_tokens` virtual tokens, right-aligned so that a sequence's
    own tokens start on a fresh block. Block size 4, 6 virtual tokens: blocks [b0, b1], pad = 2, virtual token j
    in slot pad + j (b0[2], b0[3], b1[0..3]); the sequence's token i goes to slot 8 + i and has position 6 + i.
    In a block table starting with these blocks, key slot s has position s - pad; slots < pad hold nothing."""
    blocks: tuple[int, ...]
    num_tokens: int
    block_size: int

    @property
    def pad(self) -> int:
        return len(self.blocks) * self.block_size - self.num_tokens
