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
        h = embed.new_empty(b, embed.shape[1])
        if (nq != 1 or g.first_row != 0 or b != meta.num_tokens or g.valid is not None
                or meta.sample_index.shape[0] != b or not dl.supports(h, self.dims)):
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
        vocab = model.lm_head.weight.shape[0]
        if self.workspace is None or not self.workspace.fits(b, h.dtype, self.dims, vocab):
            self.workspace = dl.Workspace(b, h.dtype, self.dims, vocab)
        logits = dl.decode_layers(h, self.table, torch.tensor(ops, dtype=torch.long) if ops else None, self.dims,
                                  meta.positions, cos, sin, meta.slot_mapping, g.block_tables, self.kv.block_size,
                                  ids=None if given else meta.input_ids, embed=None if given else embed, head=head,
                                  workspace=self.workspace)
        return logits


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
