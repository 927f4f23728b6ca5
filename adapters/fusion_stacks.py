"""One AdapterFusion's device tensors at one (layer, position), and the op over that fusion's rows of a step.

Layout (M members, R their largest rank, zero-padded: a padded rank gives act(0) * 0 = 0):
    down  [M, hidden, R]   members' adapter_down weights, transposed: z @ down -> [M, N, R]
    down_b [M, 1, R],  up [M, R, hidden] (scaling folded),  up_b [M, 1, hidden]
    query / key: (weight.T [hidden, hidden], bias [hidden]);  value: weight.T   (None: that option is false)

The op for N rows (adapters/fusion.py's math, all members at once):
    x = a_o o + a_r r;  z_m = LN_before_m(x) | x
    u = act_m(z @ down + down_b) @ up + up_b                     [M, N, hidden]  every member's `up`
    s = sum_h query(x) * key(u)                                  [M, N]
    ctx = sum_m softmax_m(s) value(u)                            [N, hidden]
    h = ctx + c_o o + c_r r
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters.bottleneck import ACTIVATIONS, LN_EPS
from adapters.fusion import FusionAdapter, FusionModule


@dataclass
class FusionStack:
    down: torch.Tensor
    down_b: torch.Tensor
    up: torch.Tensor
    up_b: torch.Tensor
    ln_before: list[tuple[torch.Tensor, torch.Tensor] | None] | None    # per member; None: no member has one
    activations: list[str]                                               # per member
    query: tuple[torch.Tensor, torch.Tensor] | None
    key: tuple[torch.Tensor, torch.Tensor] | None
    value: torch.Tensor | None
    value_before_softmax: bool
    coefficients: tuple[float, float, float, float]                     # (a_o, a_r, c_o, c_r)

    @classmethod
    def build(cls, fusion: FusionAdapter, module: FusionModule, dtype: torch.dtype,
              device: torch.device) -> FusionStack:
        members, hidden = module.members, module.members[0].down_w.shape[1]
        num, rank = len(members), max(m.rank for m in members)

        def new(*shape):
            return torch.zeros(shape, dtype=dtype, device=device)

        def put(t):
            return t.to(device=device, dtype=dtype)
        down, down_b, up, up_b = new(num, hidden, rank), new(num, 1, rank), new(num, rank, hidden), new(num, 1, hidden)
        for i, m in enumerate(members):
            down[i, :, :m.rank] = put(m.down_w).T
            down_b[i, 0, :m.rank] = put(m.down_b)
            up[i, :m.rank] = put(m.up_w).T
            up_b[i, 0] = put(m.up_b)
        norms = [tuple(map(put, m.ln_before)) if m.ln_before is not None else None for m in members]
        return cls(down, down_b, up, up_b, norms if any(n is not None for n in norms) else None,
                   [math.non_linearity for math in fusion.member_math],
                   (put(module.query[0]).T, put(module.query[1])) if module.query is not None else None,
                   (put(module.key[0]).T, put(module.key[1])) if module.key is not None else None,
                   put(module.value).T if module.value is not None else None,
                   fusion.config.value_before_softmax, fusion.coefficients)


def fused_sublayer(o: torch.Tensor, r: torch.Tensor, stack: FusionStack) -> torch.Tensor:
    """o, r [N, hidden] (the fusion's rows of the sub-layer output and of the residual entering it) -> h
    [N, hidden], the hidden state after the sub-layer. See the module docstring."""
    a_o, a_r, c_o, c_r = stack.coefficients
    x = a_o * o + a_r * r
    if stack.ln_before is None:
        z = x
    else:
        z = torch.stack([x if n is None else F.layer_norm(x, x.shape[-1:], n[0], n[1], LN_EPS)
                         for n in stack.ln_before])
    d = torch.matmul(z, stack.down) + stack.down_b                     # [M, N, R]
    if len(set(stack.activations)) == 1:
        d = ACTIVATIONS[stack.activations[0]](d)
    else:
        d = torch.stack([ACTIVATIONS[name](d[i]) for i, name in enumerate(stack.activations)])
    u = torch.matmul(d, stack.up) + stack.up_b                         # [M, N, hidden]
    q = x @ stack.query[0] + stack.query[1] if stack.query is not None else x
    k = u @ stack.key[0] + stack.key[1] if stack.key is not None else u
    value_first = stack.value is not None and stack.value_before_softmax
    v = u @ stack.value if value_first else u
    probs = torch.softmax((k * q).sum(-1), dim=0)                      # [M, N]
    ctx = (probs[:, :, None] * v).sum(0)
    if stack.value is not None and not stack.value_before_softmax:
        ctx = ctx @ stack.value
    return ctx + (c_o * o + c_r * r)
