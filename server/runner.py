"""Tensors for one step: build BatchMeta from the scheduler's decision, run the model, return logits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adapters.interface import StepItem, StepLayout
from server.batch import AttnGroup, BatchMeta
from server.config import EngineConfig
from server.kv_blocks import cdiv
from server.model.attention import KVCache
from server.model.decode_stack import DecodeRows
from server.model.llama import Linear
from server.model.loader import load_model, resolve_dtype
from server.model.quantize import weight_bytes
from server.model.weight_arena import move_to_arena
from server.scheduler import ScheduledSeq, SchedulerOutput


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.device = torch.device(config.device)
        self.model, self.spec = load_model(config.model, config.dtype, config.quantize, config.double_quant,
                                           self.device)
        self.dtype = resolve_dtype(config.dtype, self.spec)
        self.model.to(self.device)
        self.weight_arena = move_to_arena(self.model) if self.device.type == "cpu" else None
        quantized = [m.quantized for m in self.model.modules() if isinstance(m, Linear) and m.quantized is not None]
        self.num_quantized = len(quantized)
        self.double_quant = any(p.double_quant for q in quantized for p in q.parts)
        self.weight_bytes = weight_bytes(self.model)
        config.set_weight_bytes(self.weight_bytes)           # fractional budgets see what the base leaves
        self.block_size = config.block_size
        s = self.spec
        per_block = KVCache.bytes_per_block(s.num_layers, self.block_size, s.num_kv_heads, s.head_dim, self.dtype)
        self.num_blocks = config.kv_cache_bytes // per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory!r} holds no KV block "
                             f"(one block of {self.block_size} tokens takes {per_block} bytes)")
        self.kv = KVCache(s.num_layers, self.num_blocks, self.block_size, s.num_kv_heads, s.head_dim,
                          self.dtype, self.device)
        self.adapter_runtimes: list = []     # adapters.interface.AdapterRuntime, set by the engine
        self._arange: np.ndarray | None = None
        self.base_decode = True              # base-model decode steps through _base_decode (tests turn it off)
        self._rows: DecodeRows | None = None
        self.max_num_seqs = config.max_num_seqs

    def run(self, batch: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Forward one step. Returns the sequences to sample (last chunk done) and their logits [S, V] fp32."""
        self.kv.copy_blocks(batch.block_copies)
        order = sorted(batch.scheduled, key=batch_order_key)
        logits = self._base_decode(order) if self.base_decode else None
        if logits is not None:
            return order, logits
        meta, sampled = self.build_meta(order)
        logits = self.model(meta, self.kv)
        return sampled, logits

    def _base_decode(self, order: list[ScheduledSeq]) -> torch.Tensor | None:
        """The logits of a step where every sequence decodes one token of the base model (no adapter, no shared
        prefix), the steady state of serving, with no BatchMeta: the rows go into the decode stack's numpy buffers
        (server.model.decode_stack.DecodeRows) and from there to its kernel. None when the step is not one of
        those or the stack does not take it (then the general path runs)."""
        bs, top, blocks = self.block_size, 0, 0
        for item in order:
            seq = item.seq
            if item.num_tokens != 1 or not item.is_last_chunk or seq.prefix is not None or seq.adapter is not None:
                return None
            blocks = max(blocks, len(seq.block_table))
        rows = self._rows
        if rows is None or not rows.fits(len(order), blocks):
            rows = self._rows = DecodeRows(max(len(order), self.max_num_seqs), max(2 * blocks, 64), bs)
        used = 0                                        # blocks holding the step's keys
        for b, item in enumerate(order):
            seq = item.seq
            p = seq.num_computed_tokens                 # the new token's key slot: keys 0 .. p attended
            table = seq.block_table
            position = seq.first_position + p
            top, used = max(top, position), max(used, p // bs + 1)
            rows.set(b, seq.token_at(p), position, table[p // bs] * bs + p % bs, p + 1, table)
        return self.model.rows_logits(self.kv, rows, len(order), used, top)

    def build_meta(self, order: list[ScheduledSeq]) -> tuple[BatchMeta, list[ScheduledSeq]]:
        if all(item.num_tokens == 1 and item.is_last_chunk and item.seq.prefix is None for item in order):
            meta, rows = self._decode_meta(order)
            sampled = order
        else:
            meta, rows, sampled = self._meta(order)
        if any(item.seq.adapter is not None for item in order):
            layout = StepLayout([StepItem(item.seq.adapter, row, item.num_tokens, item.seq.first_adapter_layer,
                                          item.is_last_chunk, item.seq.adapter_state, item.seq.num_computed_tokens,
                                          _own_virtual_slots(item.seq, self.block_size))
                                 for item, row in zip(order, rows)])
            for runtime in self.adapter_runtimes:
                view = runtime.step_view(layout)
                if view is not None:
                    meta.adapters[runtime.name] = view
                    meta.hooks.add(runtime)
        return meta, sampled

    def _decode_meta(self, order: list[ScheduledSeq]) -> tuple[BatchMeta, list[int]]:
        """`_meta` of a step where every sequence decodes one token, with no shared prefix: the same tensors
        built in numpy and wrapped (a decode step's Python runs on caches the weight stream has just swept,
        where each torch call costs several times its warm time; numpy's calls cost less)."""
        bs, b = self.block_size, len(order)
        per_row = np.empty((5, b), dtype=np.int64)       # rows, ids, positions, slots, seen
        tables = []
        num_blocks = 0
        for i, item in enumerate(order):
            seq = item.seq
            p = seq.num_computed_tokens
            table, first = seq.block_table, seq.num_prefix_blocks * bs
            per_row[1, i] = seq.token_at(p)
            per_row[2, i] = seq.first_position + p
            per_row[3, i] = table[(first + p) // bs] * bs + (first + p) % bs
            per_row[4, i] = p                           # the query's key slot: keys 0 .. p attended
            num_blocks = max(num_blocks, p // bs + 1)
            tables.append(table)
        per_row[0] = np.arange(b)
        block_tables = np.zeros((b, num_blocks), dtype=np.int64)        # padded with block 0, masked
        for i, table in enumerate(tables):
            row = table[:num_blocks]
            block_tables[i, :len(row)] = row
        qpos = per_row[4][:, None]
        kpos = self._key_slots(num_blocks * bs)[None, :]
        causal = kpos <= qpos
        masks = {None: self._from_numpy(causal).view(b, 1, 1, -1)}
        for window in set(self.spec.sliding_window) - {None}:
            masks[window] = self._from_numpy(causal & (kpos > qpos - window)).view(b, 1, 1, -1)
        rows = self._from_numpy(per_row)
        group = AttnGroup(
            token_index=rows[0].view(b, 1),
            out_index=rows[0],
            valid=None,
            block_tables=self._from_numpy(block_tables),
            masks=masks,
            first_row=0,
        )
        meta = BatchMeta(input_ids=rows[1], positions=rows[2], slot_mapping=rows[3], attn_groups=[group],
                         sample_index=rows[0], max_position=int(per_row[2].max()))
        return meta, list(range(b))

    def _from_numpy(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)                     # shares the array's memory
        return t if self.device.type == "cpu" else t.to(self.device)

    def _key_slots(self, n: int) -> np.ndarray:
        """0 .. n - 1 (a view of one arange kept and grown by doubling)."""
        if self._arange is None or self._arange.size < n:
            self._arange = np.arange(max(n, 2 * (0 if self._arange is None else self._arange.size), 1024))
        return self._arange[:n]

    def _meta(self, order: list[ScheduledSeq]) -> tuple[BatchMeta, list[int], list[ScheduledSeq]]:
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
            # own token p: position first_position + p (num_virtual + p unless its prefix says otherwise), in
            # block-table slot (after the shared prefix) first + p
            table, first, first_position = seq.block_table, seq.num_prefix_blocks * bs, seq.first_position
            for p in range(start, start + n):
                positions.append(first_position + p)
                slots.append(table[(first + p) // bs] * bs + (first + p) % bs)
            (decodes if n == 1 else prefills).append((item, row))
            if item.is_last_chunk:
                sample_rows.append(row + n - 1)
                sampled.append(item)
        members = [[AttnMember.of(item, row, bs) for item, row in g] for g in (decodes, prefills) if g]
        groups = [self.attn_group(m) for m in members]
        meta = BatchMeta(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            slot_mapping=self._tensor(slots),
            attn_groups=groups,
            sample_index=self._tensor(sample_rows),
            layer_attn_groups=self._drop_prefixes(members, groups),
            max_position=max(positions),
        )
        return meta, rows, sampled

    def attn_group(self, members: list[AttnMember]) -> AttnGroup:
        bs = self.block_size
        num_q = max(m.num_queries for m in members)
        num_blocks = max(cdiv(m.first_slot + m.num_queries, bs) for m in members)
        token_index, out_index, valid, qpos, tables = [], [], [], [], []
        for m in members:
            n, last = m.num_queries, m.num_queries - 1
            token_index.append([m.row + min(q, last) for q in range(num_q)])
            out_index.extend(range(m.row, m.row + n))
            valid.extend([True] * n + [False] * (num_q - n))
            # padding repeats the last real query's position, so no row of the mask is empty
            qpos.append([m.first_slot - m.pad + min(q, last) for q in range(num_q)])
            table = m.block_table[:num_blocks]
            tables.append(table + [0] * (num_blocks - len(table)))
        qpos_t = self._tensor(qpos)[:, None, :, None]                                  # [B, 1, Q, 1]
        pads = self._tensor([m.pad for m in members])[:, None, None, None]
        kpos = torch.arange(num_blocks * bs, device=self.device) - pads                # [B, 1, 1, K]
        causal = (kpos >= 0) & (kpos <= qpos_t)
        masks = {None: causal}
        for window in set(self.spec.sliding_window) - {None}:
            masks[window] = causal & (kpos > qpos_t - window)
        first = members[0].row
        dense = all(valid) and out_index == list(range(first, first + len(out_index)))
        return AttnGroup(
            token_index=self._tensor(token_index),
            out_index=self._tensor(out_index),
            valid=None if all(valid) else torch.tensor(valid, device=self.device),
            block_tables=self._tensor(tables),
            masks=masks,
            first_row=first if dense else None,
        )

    def _drop_prefixes(self, members: list[list[AttnMember]], groups: list[AttnGroup]) -> list[list] | None:
        """AdapterDrop for shared prefixes: in layer l, a member whose first_layer > l attends without its prefix
        blocks (not gathered, not computed). One group per distinct set of dropping members, built once."""
        if not any(m.num_virtual and m.first_layer for group in members for m in group):
            return None
        built: dict[tuple, AttnGroup] = {}
        by_layer = []
        for layer in range(self.spec.num_layers):
            layer_groups = []
            for i, (group_members, group) in enumerate(zip(members, groups)):
                drop = tuple(bool(m.num_virtual) and m.first_layer > layer for m in group_members)
                if any(drop) and (i, drop) not in built:
                    built[(i, drop)] = self.attn_group([m.without_prefix(self.block_size) if d else m
                                                        for m, d in zip(group_members, drop)])
                layer_groups.append(built[(i, drop)] if any(drop) else group)
            by_layer.append(layer_groups)
        return by_layer

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


@dataclass
class AttnMember:
    """One sequence's queries in an attention group. Key slot s of its block table has position s - pad;
    query q sits in slot first_slot + q (position first_slot + q - pad). Keys at positions < num_virtual are
    its adapter's shared prefix (the first pad + num_virtual slots), left out in layers below first_layer
    (AdapterDrop)."""
    row: int                      # flat row of its first query
    num_queries: int
    first_slot: int
    block_table: list[int]
    pad: int = 0
    num_virtual: int = 0
    first_layer: int = 0

    def without_prefix(self, block_size: int) -> AttnMember:
        """The same queries over its own blocks only: key slot s then has position s + num_virtual."""
        num_prefix_slots = self.pad + self.num_virtual
        return AttnMember(self.row, self.num_queries, self.first_slot - num_prefix_slots,
                          self.block_table[num_prefix_slots // block_size:], pad=-self.num_virtual)

    @classmethod
    def of(cls, item: ScheduledSeq, row: int, block_size: int) -> AttnMember:
        seq = item.seq
        prefix = seq.prefix
        if prefix is None:
            return cls(row, item.num_tokens, seq.num_computed_tokens, seq.block_table)
        return cls(row, item.num_tokens, len(prefix.blocks) * block_size + seq.num_computed_tokens,
                   seq.block_table, prefix.pad, prefix.num_tokens, seq.first_adapter_layer)


def _own_virtual_slots(seq, block_size: int) -> list[int] | None:
    """Flat KV rows of the virtual tokens of a sequence holding its own copy of its prefix (seq.whole_prompt)."""
    prefix = seq.prefix
    if prefix is None or not seq.whole_prompt:
        return None
    table = seq.block_table
    return [table[s // block_size] * block_size + s % block_size
            for s in range(prefix.pad, prefix.pad + prefix.num_tokens)]


def batch_order_key(item: ScheduledSeq):
    """Tokens of one adapter end up contiguous (segments for SGMV); base-model requests first; within an adapter,
    decodes before prefill chunks (so its decode rows are one run: one short segment for the CPU LoRA kernel)."""
    adapter = item.seq.adapter
    return (adapter is not None, getattr(adapter, "slot", 0) if adapter is not None else 0, item.num_tokens > 1)
