"""A decode-only step as one kernels/decode_layers call: the embedding, every decoder layer and the lm_head.

At one sequence a small, deep model's step is its weight read; what the kernel does not do costs on top of it
per step (SmolLM2-135M bf16: ~1 ms of Python over 30 layers' addresses, the RoPE tables, the final norm and the
lm_head's own call, bench/step_floor.py). So the addresses that never change (weights, KV cache tensors) are put
in the kernel's table once; a step writes only its masks and its adapters' LoRA ops into it.

The model's module path is the reference; `DecodeStack.logits` returns None (nothing done) whenever this one does
not apply: prefill rows, adapters acting inside the layers other than by LoRA ops, a 4-bit base, more rows than
the kernel takes.
"""
from __future__ import annotations

import numpy as np
import torch

from kernels import decode_layers as dl
from server.batch import BatchMeta
from server.model.attention import KVCache

MASK = dl.FIELDS.index("mask")
LORA0 = dl.FIELDS.index("lora_qkv")


class DecodeStack:
    def __init__(self, model, kv: KVCache):
        """model: server.model.llama.LlamaModel. `table` is None when a layer cannot run in the kernel."""
        s = model.spec
        self.model, self.kv = model, kv
        self.key = _key(kv)
        self.dims = dl.Dims(s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size,
                            s.rms_norm_eps, s.head_dim ** -0.5)
        self.linears = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                         layer.mlp.down_proj) for layer in model.layers]
        self.windows = [layer.self_attn.window for layer in model.layers]
        self.table = self._table()
        self.table_np = None if self.table is None else self.table.numpy()
        self.workspace: dl.Workspace | None = None            # for the most rows seen so far
        self.supported: dict[int, bool] = {}                  # rows -> dl.supports (h is always like `residual`)
        self.residual: torch.Tensor | None = None             # the stack's h, for the most rows seen so far
        self.base_head: dl.Head | None = None                 # the lm_head with no LoRA ops
        self.has_ops = False                                  # the table's LoRA columns point at ops

    def _table(self) -> torch.Tensor | None:
        rows = []
        for i, layer in enumerate(self.model.layers):
            linears = self.linears[i]
            if any(m.quantized is not None or not m.weight.is_contiguous() for m in linears):
                return None
            row = [layer.input_layernorm.weight.data_ptr()]
            for m in linears[:2]:
                row += [m.weight.data_ptr(), 0 if m.bias is None else m.bias.data_ptr()]
            row.append(layer.post_attention_layernorm.weight.data_ptr())
            for m in linears[2:]:
                row += [m.weight.data_ptr(), 0 if m.bias is None else m.bias.data_ptr()]
            row += [self.kv.k[i].data_ptr(), self.kv.v[i].data_ptr(), 0]        # the mask: per step
            rows.append(row + [0] * (len(dl.FIELDS) - len(row)))              # LoRA ops: per step
        head = self.model.lm_head
        if head.quantized is not None or not head.weight.is_contiguous():
            return None
        return torch.tensor(rows, dtype=torch.long)

    def fits(self, kv: KVCache) -> bool:
        return self.key == _key(kv)

    def logits(self, meta: BatchMeta) -> torch.Tensor | None:
        """The step's logits [M, V] (M = every row, all sampled), or None when the step is not decode-only or
        its adapters cannot all act as the kernel's ops."""
        hooks, model = meta.hooks, self.model
        if (self.table is None or hooks.linear_input or hooks.sublayer or hooks.kv
                or len(hooks.native_linear) != len(hooks.linear)
                or meta.layer_attn_groups is not None or len(meta.attn_groups) != 1):
            return None
        g = meta.attn_groups[0]
        b, nq = g.token_index.shape
        embed = model.embed_tokens.weight
        h = self._residual(b)
        if (h is None or nq != 1 or g.first_row != 0 or b != meta.num_tokens or g.valid is not None
                or meta.sample_index.shape[0] != b):
            return None
        masks = {}
        for window, mask in g.masks.items():
            mask = mask.view(b, -1)
            if not mask.is_contiguous():
                return None
            masks[window] = mask
        if any(w not in masks for w in self.windows):
            return None
        table = self.table_np                   # the table's memory, written through numpy (no torch dispatch)
        if len(masks) == 1:
            table[:, MASK] = next(iter(masks.values())).data_ptr()
        else:
            table[:, MASK] = [masks[w].data_ptr() for w in self.windows]
        ops, head_ops = [], (0, 0)
        if hooks.native_linear:
            columns = []
            for linears in self.linears:
                row = []
                for m in linears:
                    first = len(ops)
                    if not _add_ops(ops, hooks.native_linear, meta, m):
                        return None
                    row += [first, len(ops) - first]
                columns.append(row)
            first = len(ops)
            if not _add_ops(ops, hooks.native_linear, meta, model.lm_head):
                return None
            head_ops = (first, len(ops) - first)
            table[:, LORA0:] = columns
        elif self.has_ops:
            table[:, LORA0:] = 0
        self.has_ops = bool(ops)
        top = meta.max_position if meta.max_position is not None else int(meta.positions.max())
        cos, sin = model.rope_tables(top + 1, h.dtype)
        head = dl.Head(model.norm.weight, model.lm_head.weight, model.lm_head.bias, head_ops)
        given = bool(hooks.embed) or meta.inputs_embeds is not None     # else the kernel gathers the rows
        if given:
            h = model.embed(meta)
            if h.dtype != embed.dtype or not h.is_contiguous():
                return None
        logits = dl.decode_layers(h, self.table, torch.tensor(ops, dtype=torch.long) if ops else None, self.dims,
                                  meta.positions, cos, sin, meta.slot_mapping, g.block_tables, self.kv.block_size,
                                  ids=None if given else meta.input_ids, embed=None if given else embed, head=head,
                                  workspace=self._workspace(b))
        return logits

    def rows_logits(self, rows: DecodeRows, b: int, blocks: int, top: int) -> torch.Tensor | None:
        """`logits` of a decode-only step of b base-model rows (no adapter) given in `rows` (their key slots in
        `blocks` blocks, positions up to `top`), or None when the kernel does not take it (a sliding window, a
        quantized layer, too many rows)."""
        model = self.model
        if self.table is None or any(w is not None for w in self.windows):
            return None
        h = self._residual(b)
        if h is None:
            return None
        mask = rows.addresses[4]
        if self.table_np[0, MASK] != mask:             # the general path's masks were there
            self.table_np[:, MASK] = mask
        if self.has_ops:
            self.table_np[:, LORA0:] = 0
            self.has_ops = False
        cos, sin = model.rope_tables(top + 1, h.dtype)
        if self.base_head is None:
            self.base_head = dl.Head(model.norm.weight, model.lm_head.weight, model.lm_head.bias, (0, 0))
        return dl.decode_layers(h, self.table, None, self.dims, None, cos, sin, None, None, self.kv.block_size,
                                embed=model.embed_tokens.weight, head=self.base_head, workspace=self._workspace(b),
                                rows=rows.row_addresses(blocks))

    def _residual(self, b: int) -> torch.Tensor | None:
        """The kernel's residual stream for b rows (the first b of one buffer kept for the most rows seen), or
        None when the kernel does not take b rows."""
        embed = self.model.embed_tokens.weight
        if self.residual is None or self.residual.shape[0] < b:
            self.residual = embed.new_empty(b, embed.shape[1])
        h = self.residual[:b]
        if b not in self.supported:
            self.supported[b] = dl.supports(h, self.dims)
        return h if self.supported[b] else None

    def _workspace(self, b: int) -> dl.Workspace:
        vocab = self.model.lm_head.weight.shape[0]
        if self.workspace is None or not self.workspace.fits(b, self.residual.dtype, self.dims, vocab):
            self.workspace = dl.Workspace(b, self.residual.dtype, self.dims, vocab)
        return self.workspace


class DecodeRows:
    """The per-row inputs of decode-only steps in numpy buffers kept from step to step, written straight from the
    runner's sequences: a step makes no tensor for them (after a weight stream every torch call runs on cold
    caches). Row b's mask is causal, its first `keys[b]` entries set (no sliding window); table rows hold the
    sequences' block tables from their start, entries past a row's own left as they were (never read)."""

    def __init__(self, rows: int, blocks: int, block_size: int):
        self.block_size, self.blocks = block_size, blocks
        self.ids, self.positions, self.slots = (np.zeros(rows, dtype=np.int64) for _ in range(3))
        self.tables = np.zeros((rows, blocks), dtype=np.int64)
        self.mask = np.zeros((rows, blocks * block_size), dtype=np.bool_)
        self.keys = [0] * rows
        self.addresses = [a.ctypes.data for a in (self.ids, self.positions, self.slots, self.tables, self.mask)]

    def fits(self, rows: int, blocks: int) -> bool:
        return rows <= len(self.keys) and blocks <= self.blocks

    def set(self, b: int, token: int, position: int, slot: int, keys: int, table: list[int]) -> None:
        """Row b: its token at `position` (cache row `slot`) attends to key slots 0 .. keys - 1 of `table`."""
        self.ids[b], self.positions[b], self.slots[b] = token, position, slot
        self.tables[b, :len(table)] = table
        old = self.keys[b]
        if keys > old:
            self.mask[b, old:keys] = True
        elif keys < old:
            self.mask[b, keys:old] = False
        self.keys[b] = keys

    def row_addresses(self, blocks: int) -> dl.RowAddresses:
        ids, positions, slots, tables, _ = self.addresses
        return dl.RowAddresses(ids, positions, slots, tables, blocks, self.blocks, self.blocks * self.block_size)


def _add_ops(ops: list, hooks, meta: BatchMeta, linear) -> bool:
    """Append every hook's LoRA ops for `linear`; False when one cannot give them."""
    for hook in hooks:
        found = hook(meta, linear)
        if found is None:
            return False
        ops += found
    return True


def _key(kv: KVCache) -> tuple:
    return id(kv), kv.k[0].data_ptr(), kv.v[0].data_ptr()
