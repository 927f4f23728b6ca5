"""Tensors for one step: build BatchMeta from the scheduler's decision, run the model, return logits."""
from __future__ import annotations

import torch

from server.batch import AttnGroup, BatchMeta
from server.config import EngineConfig
from server.kv_blocks import cdiv
from server.model.attention import KVCache
from server.model.loader import load_model, resolve_dtype
from server.scheduler import ScheduledSeq, SchedulerOutput
from server.step_layout import StepLayout


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.model, self.spec = load_model(config.model, config.dtype)
        self.dtype = resolve_dtype(config.dtype, self.spec)
        self.device = torch.device(config.device)
        self.model.to(self.device)
        self.block_size = config.block_size
        s = self.spec
        per_block = KVCache.bytes_per_block(s.num_layers, self.block_size, s.num_kv_heads, s.head_dim, self.dtype)
        self.num_blocks = config.kv_cache_bytes // per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory!r} holds no KV block "
                             f"(one block of {self.block_size} tokens takes {per_block} bytes)")
        self.kv = KVCache(s.num_layers, self.num_blocks, self.block_size, s.num_kv_heads, s.head_dim,
                          self.dtype, self.device)
        self.adapter_runtimes: list = []     # each: .kind, .step_view(StepLayout) -> per-step view or None

    def run(self, batch: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Forward one step. Returns the sequences to sample (last chunk done) and their logits [S, V] fp32."""
        order = sorted(batch.scheduled, key=batch_order_key)
        meta, sampled = self.build_meta(order)
        logits = self.model(meta, self.kv)
        return sampled, logits

    def build_meta(self, order: list[ScheduledSeq]) -> tuple[BatchMeta, list[ScheduledSeq]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        rows: list[int] = []
        sampled: list[ScheduledSeq] = []
        decodes: list[tuple[ScheduledSeq, int]] = []      # (seq, first flat row)
        prefills: list[tuple[ScheduledSeq, int]] = []
        for item in order:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            row = len(input_ids)
            rows.append(row)
            input_ids.extend(seq.all_ids[start:start + n])
            table = seq.block_table
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            (decodes if n == 1 else prefills).append((item, row))
            if item.is_last_chunk:
                sample_rows.append(row + n - 1)
                sampled.append(item)
        groups = [self._group(g) for g in (decodes, prefills) if g]
        meta = BatchMeta(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            slot_mapping=self._tensor(slots),
            attn_groups=groups,
            sample_index=self._tensor(sample_rows),
        )
        layout = StepLayout(order, rows)
        for runtime in self.adapter_runtimes:
            view = runtime.step_view(layout)
            if view is not None:
                meta.adapters[runtime.kind] = view
        return meta, sampled

    def _group(self, members: list[tuple[ScheduledSeq, int]]) -> AttnGroup:
        bs = self.block_size
        num_q = max(item.num_tokens for item, _ in members)
        ctx = max(item.seq.num_computed_tokens + item.num_tokens for item, _ in members)
        num_blocks = cdiv(ctx, bs)
        token_index, out_index, valid, qpos, tables = [], [], [], [], []
        for item, row in members:
            n, start = item.num_tokens, item.seq.num_computed_tokens
            token_index.append([row + min(q, n - 1) for q in range(num_q)])
            out_index.extend(range(row, row + n))
            valid.extend([True] * n + [False] * (num_q - n))
            qpos.append([start + q for q in range(n)] + [0] * (num_q - n))   # padding attends key 0 only
            table = item.seq.block_table[:num_blocks]
            tables.append(table + [0] * (num_blocks - len(table)))
        qpos_t = self._tensor(qpos)[:, None, :, None]                      # [B, 1, Q, 1]
        kpos = torch.arange(num_blocks * bs, device=self.device)           # [K]
        causal = kpos <= qpos_t
        masks = {None: causal}
        for window in set(self.spec.sliding_window) - {None}:
            masks[window] = causal & (kpos > qpos_t - window)
        return AttnGroup(
            token_index=self._tensor(token_index),
            out_index=self._tensor(out_index),
            valid=None if all(valid) else torch.tensor(valid, device=self.device),
            block_tables=self._tensor(tables),
            masks=masks,
        )

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def batch_order_key(item: ScheduledSeq):
    """Tokens of one adapter end up contiguous (segments for SGMV); base-model requests first."""
    adapter = item.seq.adapter
    return (adapter is not None, getattr(adapter, "slot", 0) if adapter is not None else 0)
