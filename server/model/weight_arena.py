"""The base model's dense weights moved into one mapping on 2 MiB pages, in the order a decode step reads them.

At one sequence a decode step is a stream over every weight (bench/step_floor.py). On 4 KiB pages that stream
crosses a page every 4 KiB (SmolLM2-135M bf16: 66k pages a step) and the CPU's prefetchers stop at each: a sum
over 1 GiB read 24 GB/s on 4 KiB pages and 30 GB/s on transparent huge pages (2-core AVX-512 VM, 2026-12-03);
SmolLM2 bf16's decode step went from 11.9 to 10.3-10.7 ms with its weights moved here.

Linux transparent huge pages in "madvise" (or "always") mode; where the mapping cannot be advised (another OS,
THP off) the weights still move, on whatever pages the kernel gives. The values do not change: a copy.
"""
from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_ALIGN = 4096                      # each tensor starts on its own 4 KiB boundary (a cache line would do; a page
                                   # keeps a tensor's start where the prefetchers begin a stream)


def decode_order(model: nn.Module) -> list[nn.Parameter]:
    """The parameters in the order a decode step reads them (each layer's norms, fused matmuls and biases, then the
    final norm and the embedding / lm_head), then any others."""
    ordered = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        ordered += [layer.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight,
                    attn.o_proj.bias, layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight,
                    mlp.gate_up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias]
    ordered += [model.norm.weight, model.lm_head.weight, model.lm_head.bias, model.embed_tokens.weight]
    ordered += [p for p in model.parameters()]
    return [p for p in ordered if p is not None]


def move_to_arena(model: nn.Module) -> mmap.mmap | None:
    """Move every dense, contiguous CPU parameter of `model` (a server.model.llama.LlamaModel) into one new
    mapping (tensors that share memory, e.g. a tied lm_head, stay shared). Returns the mapping, which the
    parameters keep alive, or None when there is nothing to move. Call before anything records the weights'
    addresses (server.model.decode_stack)."""
    groups: dict[int, list[nn.Parameter]] = {}          # storage address -> the parameters on it
    for p in decode_order(model):
        if p.device.type != "cpu" or not p.is_contiguous() or p.numel() == 0 or 0 in p.stride():
            continue                                     # a 4-bit layer's zero-strided placeholder, an empty bias
        group = groups.setdefault(p.data_ptr(), [])
        if all(q is not p for q in group):
            group.append(p)
    groups = {ptr: g for ptr, g in groups.items()      # parameters sharing a start as different tensors: left as
              if all(q.shape == g[0].shape and q.dtype == g[0].dtype for q in g)}        # they are (none here)
    if not groups:
        return None
    sizes = [-(-g[0].numel() * g[0].element_size() // _ALIGN) * _ALIGN for g in groups.values()]
    arena, raw = huge_page_buffer(sum(sizes))
    offset = 0
    for group, size in zip(groups.values(), sizes):
        first = group[0]
        nbytes = first.numel() * first.element_size()
        view = raw[offset:offset + nbytes].view(first.dtype).view(first.shape)
        view.copy_(first.data)
        for p in group:
            p.data = view
        offset += size
    return arena


def huge_page_buffer(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """A new private anonymous mapping advised onto transparent huge pages, and a uint8 tensor of `nbytes` in it
    starting on a 2 MiB boundary (the tensor keeps the mapping alive). Zero-filled, its pages not yet touched."""
    length = -(-(nbytes + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE
    arena = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            arena.madvise(mmap.MADV_HUGEPAGE)
        except OSError:                                  # THP not built in: 4 KiB pages
            pass
    raw = torch.frombuffer(arena, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % HUGE_PAGE
    return arena, raw[offset:offset + nbytes]
