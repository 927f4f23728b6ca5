"""Paged attention: one call per group. Decode groups (one query per sequence) on the CPU go to the paged decode
kernel, which reads the KV blocks in place (kernels/paged_decode.py); other groups gather their blocks and
call SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import paged_decode as pd
from server.batch import AttnGroup


class KVCache:
    """Per layer: k, v of shape [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block dst := block src in every layer (copy-on-write of shared blocks; each dst is a fresh block, never
        a src of the same call)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.k[0].device)
        dst = torch.tensor([d for _, d in pairs], device=self.k[0].device)
        for cache in (*self.k, *self.v):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, groups: list[AttnGroup],
                    window: int | None, scale: float) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every query to its sequence's cached keys.

    q: [T, H, D]; k, v: [T, KVH, D]; k_cache, v_cache: [NBLK, BS, KVH, D] (modified in place: rows
    `slot_mapping` get k, v). Returns [T, H * D].
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
    num_tokens = q.shape[0]
    out = None
    for g in groups:
        b, nq = g.token_index.shape
        if g.first_row is not None:                                        # rows in order: a view, no gather
            qg = q[g.first_row:g.first_row + b * nq].view(b, nq, *q.shape[1:])
        else:
            qg = q[g.token_index]                                          # [B, Q, H, D]
        mask = g.masks[window]
        if nq == 1 and pd.supports(qg[:, 0], k_cache, v_cache, g.block_tables, mask.view(b, -1)):
            og = pd.paged_decode(qg[:, 0], k_cache, v_cache, g.block_tables, mask.view(b, -1), scale)
            og = og.view(b, -1)
        else:
            kg = gather_blocks(k_cache, g.block_tables).transpose(1, 2)     # [B, KVH, K, D]
            vg = gather_blocks(v_cache, g.block_tables).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg.transpose(1, 2), kg, vg, attn_mask=mask, scale=scale,
                                                enable_gqa=True)             # [B, H, Q, D]
            og = og.transpose(1, 2).reshape(b * nq, -1)
        if g.first_row == 0 and b * nq == num_tokens:                      # one group holds every row
            return og
        if g.valid is not None:
            og = og[g.valid]
        if out is None:
            out = q.new_empty(num_tokens, q.shape[1] * head_dim)
        out.index_copy_(0, g.out_index, og)
    return out


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [NBLK, BS, KVH, D], block_tables [B, NB] -> [B, NB * BS, KVH, D]: each sequence's keys in order.

    One index_select of whole blocks (contiguous rows): ~1.7x faster on CPU than advanced indexing."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    b, nb = block_tables.shape
    rows = cache.view(num_blocks, -1).index_select(0, block_tables.reshape(-1))
    return rows.view(b, nb * block_size, num_kv_heads, head_dim)
