"""Llama / Mistral / Qwen2 decoder, written against BatchMeta (flat tokens, paged KV).

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs); `Linear.slices` records where each
HF sub-projection lives in the fused output so per-module adapter deltas can be added to their columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters import interface
from kernels import skinny_gemm
from server.batch import BatchMeta
from server.model.attention import KVCache, paged_attention
from server.model.decode_stack import DecodeStack
from adapters.model_spec import ModelSpec


class Linear(nn.Module):
    """y = x @ W.T (+ b). `slices`: HF module name -> (first column, width) within y.

    Adapters act through this step's hooks (adapters/interface.py): `meta.hooks.linear_input` may replace the
    input of the matmul, `meta.hooks.linear` modify y in place for the tokens that carry them.
    With a 4-bit base, `self.quantized` (kernels.nf4.NF4Linear) holds W and computes x @ W.T; `self.weight` is
    then a zero-strided placeholder with W's shape, dtype and device (no memory), and `dense_weight()` dequantizes.
    """

    def __init__(self, in_features: int, slices: dict[str, int], bias: bool, layer: int):
        super().__init__()
        self.slices: dict[str, tuple[int, int]] = {}
        col = 0
        for name, width in slices.items():
            self.slices[name] = (col, width)
            col += width
        self.weight = nn.Parameter(torch.empty(col, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(col), requires_grad=False) if bias else None
        self.layer = layer
        self.quantized = None

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        hooks = meta.hooks
        for hook in hooks.linear_input:
            x = hook(x, meta, self)
        y = skinny_gemm.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x, self.bias)
        for hook in hooks.linear:
            hook(x, y, meta, self)
        return y

    def dense_weight(self, col: int, width: int) -> torch.Tensor:
        """Rows [col, col + width) of W: a view, or a new dequantized tensor when 4-bit."""
        if self.quantized is not None:
            return self.quantized.dequantize(col, width)
        return self.weight[col:col + width]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as HF (normalise in fp32, cast back, then scale) in one ATen call: F.rms_norm computes
        # x * rsqrt(mean(x^2) + eps) * weight in that order, bit for bit HF's in fp32; in bf16 / fp16 it would
        # scale before casting back, so there the scale stays a separate step as in HF.
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF (non-interleaved) RoPE. x: [T, heads, D]; cos, signed_sin: [T, 1, D] (LlamaModel.rope).

    HF: x * cos + cat(-x2, x1) * sin. Here cat(x2, x1) is one `roll` and the sign sits in signed_sin =
    cat(-sin1, sin2), built once per step: (-a) * b == a * (-b) exactly, so the result is HF's bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.qkv_proj = Linear(spec.hidden_size, {"q_proj": spec.q_size, "k_proj": spec.kv_size,
                                                  "v_proj": spec.kv_size}, spec.qkv_bias, layer)
        self.o_proj = Linear(spec.q_size, {"o_proj": spec.hidden_size}, spec.o_bias, layer)
        self.window = spec.sliding_window[layer]
        self.scale = spec.head_dim ** -0.5

    def forward(self, x, cos, sin, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        s = self.spec
        qkv = self.qkv_proj(x, meta)
        # q and k are adjacent columns: rotate their heads in one go
        qk = rotate(qkv[:, :s.q_size + s.kv_size].view(-1, s.num_heads + s.num_kv_heads, s.head_dim), cos, sin)
        q, k = qk[:, :s.num_heads], qk[:, s.num_heads:]
        v = qkv[:, s.q_size + s.kv_size:].view(-1, s.num_kv_heads, s.head_dim)
        for hook in meta.hooks.kv:            # gated prefixes rescale their requests' own prefix copies
            hook(x, kv.k[self.layer], kv.v[self.layer], meta, self.layer)
        o = paged_attention(q, k, v, kv.k[self.layer], kv.v[self.layer], meta.slot_mapping, meta.groups(self.layer),
                            self.window, self.scale)
        return self.o_proj(o, meta)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.inter = spec.intermediate_size
        self.gate_up_proj = Linear(spec.hidden_size, {"gate_proj": self.inter, "up_proj": self.inter},
                                   spec.mlp_bias, layer)
        self.down_proj = Linear(self.inter, {"down_proj": spec.hidden_size}, spec.mlp_bias, layer)

    def forward(self, x, meta: BatchMeta) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, meta)
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up, meta)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, layer)

    def forward(self, h, cos, sin, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        x = self.input_layernorm(h)
        h = self._residual(interface.ATTENTION, x, h, self.self_attn(x, cos, sin, meta, kv), meta)
        x = self.post_attention_layernorm(h)
        return self._residual(interface.MLP, x, h, self.mlp(x, meta), meta)

    def _residual(self, name: str, x, residual, out, meta: BatchMeta) -> torch.Tensor:
        """residual + out, then the sub-layer hooks (bottleneck adapters) rewrite their tokens' rows."""
        h = residual + out
        for hook in meta.hooks.sublayer:
            hook(name, x, residual, out, h, meta, self)
        return h


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        # layer index num_layers marks the lm_head: its rows are the sampled tokens only
        self.lm_head = Linear(spec.hidden_size, {"lm_head": spec.vocab_size}, False, spec.num_layers)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", spec.inv_freq.clone(), persistent=False)
        self._rope_tables: dict = {}
        self._decode_stack: DecodeStack | None = None

    def linears(self) -> list[Linear]:
        """Every (fused) linear, decoder layers in order, then the lm_head."""
        return [m for m in self.modules() if isinstance(m, Linear)]

    def base_weight(self, layer: int | None, module: str) -> torch.Tensor:
        """The frozen weight [out, in] of HF module `module` (a view into our fused weights; a new dequantized
        tensor for a 4-bit layer, as PEFT dequantizes a bitsandbytes layer for DoRA's column norm)."""
        if module == "embed_tokens":
            return self.embed_tokens.weight
        linear, col, width = self._site(layer, module)
        return linear.dense_weight(col, width)

    def base_bias(self, layer: int | None, module: str) -> torch.Tensor | None:
        """The frozen bias [out] of HF module `module`, or None when the architecture gives it none."""
        linear, col, width = self._site(layer, module)
        return None if linear.bias is None else linear.bias[col:col + width]

    def _site(self, layer: int | None, module: str) -> tuple[Linear, int, int]:
        if module == "lm_head":
            return self.lm_head, 0, self.lm_head.weight.shape[0]
        block = self.layers[layer].self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") \
            else self.layers[layer].mlp
        for linear in (m for m in block.modules() if isinstance(m, Linear)):
            if module in linear.slices:
                col, width = linear.slices[module]
                return linear, col, width
        raise KeyError(f"no module {module!r} in layer {layer}")

    def rope(self, positions: torch.Tensor, dtype: torch.dtype,
             max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) of every token, [T, 1, D] each: rows of `rope_tables`, used by every layer."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else 0
        cos, sin = self.rope_tables(max_position + 1, dtype)
        return cos[positions][:, None, :], sin[positions][:, None, :]

    def rope_tables(self, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [P, D] of positions 0 .. P - 1, P >= size: computed once (grown by doubling), as
        vLLM keeps its cos_sin_cache, so a step only gathers its rows."""
        key = (dtype, self.inv_freq.device)
        cached = self._rope_tables.get(key)
        if cached is None or cached[0].shape[0] < size:
            n = max(size, 4096, 2 * (0 if cached is None else cached[0].shape[0]))
            positions = torch.arange(n, device=self.inv_freq.device)
            freqs = positions[:, None].float() * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = self.spec.rope_attention_scaling
            cos, sin = emb.cos() * scale, emb.sin() * scale
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)       # see rotate()
            cached = self._rope_tables[key] = (cos.to(dtype).contiguous(), signed_sin.to(dtype).contiguous())
        return cached

    def embed(self, meta: BatchMeta) -> torch.Tensor:
        h = self.embed_tokens(meta.input_ids) if meta.inputs_embeds is None else meta.inputs_embeds.clone()
        for hook in meta.hooks.embed:
            hook(h, meta)
        return h

    def rows_logits(self, kv: KVCache, rows, b: int, blocks: int, top: int) -> torch.Tensor | None:
        """A decode-only step of base-model rows given in numpy buffers (server.model.decode_stack.DecodeRows),
        straight to the decode stack: its logits [b, vocab] (float32), or None where the stack does not take it."""
        if self._decode_stack is None or not self._decode_stack.fits(kv):
            self._decode_stack = DecodeStack(self, kv)
        return self._decode_stack.rows_logits(rows, b, blocks, top)

    @torch.inference_mode()
    def forward(self, meta: BatchMeta, kv: KVCache) -> torch.Tensor:
        """Returns logits [S, vocab] (float32) for the rows `meta.sample_index`."""
        if self._decode_stack is None or not self._decode_stack.fits(kv):
            self._decode_stack = DecodeStack(self, kv)
        logits = self._decode_stack.logits(meta)            # a decode-only step in one kernel call
        if logits is not None:
            return logits
        h = self.embed(meta)
        cos, sin = self.rope(meta.positions, h.dtype, meta.max_position)
        for layer in self.layers:
            h = layer(h, cos, sin, meta, kv)
        h = self.norm(h[meta.sample_index])
        return self.lm_head(h, meta).float()
