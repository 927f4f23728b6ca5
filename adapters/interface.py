"""The adapter interface: where adapters act on the model, and what the engine asks of each adapter kind.

Lowest layer of the adapter side: imported by the model (server/model, server/batch) and by every runtime in
adapters/, it imports neither. Imports flow api -> engine -> model -> adapters -> kernels.

An adapter kind is served by one `AdapterRuntime`. The runtime list comes from `adapters/catalog.py`; the engine
builds its kind -> runtime / loader tables from each runtime's `kinds` and never names a kind. Per step, the runner
hands every runtime a `StepLayout` (which tokens belong to which request and adapter); a runtime with work this
step returns a view (its segments, gathered vectors, ...) and its hooks are called with `meta` holding that view
at `meta.adapters[runtime.name]`. Hook points, in forward order:

    on_embed(h, meta)                                     token embeddings, before layer 0
    on_linear_input(x, meta, linear) -> x                 a linear's input, before its matmul
    on_linear(x, y, meta, linear)                         a linear's output (y modified in place)
    on_native_linear(meta, linear) -> ops                 the same, as C ops for the whole-stack decode kernel
    on_kv(x, k_cache, v_cache, meta, layer)               in attention, after q/k/v, before the cache is read
    on_sublayer(name, x, residual, out, h, meta, layer)   after a decoder layer's "attention" / "mlp" sub-layer
    virtual_kv(weights) -> PrefixKV | VirtualTokens       K/V as data: the engine owns the blocks and writes them

A hook left as None costs nothing; hooks of runtimes with no view this step are not called at all.

Union adapters (one adapter acting through several runtimes: AdapterHub's ConfigUnion, i.e. MAM = prefix tuning
+ parallel bottleneck, UniPELT = prefix + SeqBn + LoRA): the union kind is served by `adapters/union.py`'s
`UnionRuntime`, which owns no tensors and no hooks. Its `load` splits the checkpoint by sub-config: each part goes
to the runtime serving that part's kind, through that runtime's `load_part(path, config, tensors, source)`; the
weights container (`UnionWeights`) keeps {part kind: part weights}; install / remove / virtual_kv fan out to the part
runtimes with the adapter's one slot. Per step, a runtime sees a union adapter's tokens as its own when one of the
adapter's `part_kinds` (kept in the handle's `info`, also while the weights are on disk) is one of its `kinds`
(`StepLayout.slots_of`). A new part kind = `load_part` on its runtime plus its sub-config in
`adapters.config.adapterhub_kind`; nothing in the engine changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

ATTENTION = "attention"     # on_sublayer names
MLP = "mlp"


# ---- what the model exposes to runtimes ------------------------------------------------------------------------
class LinearSite(Protocol):
    """One (possibly fused) linear of the model: y = x @ weight.T (+ bias)."""
    weight: torch.Tensor            # [out, in]
    bias: torch.Tensor | None       # [out]
    layer: int                      # decoder layer index; num_layers = lm_head (its rows: sampled tokens only)
    slices: dict[str, tuple[int, int]]   # HF module name ("q_proj", ...) -> (first column, width) within y


class AdaptableModel(Protocol):
    spec: object                    # adapters.model_spec.ModelSpec
    embed_tokens: torch.nn.Embedding

    def linears(self) -> list[LinearSite]: ...

    def base_weight(self, layer: int | None, module: str) -> torch.Tensor: ...

    def base_bias(self, layer: int | None, module: str) -> torch.Tensor | None: ...


def linear_sites(model: AdaptableModel) -> dict[tuple[int, str], LinearSite]:
    """(layer, HF module name) -> the (possibly fused) linear computing it."""
    return {(linear.layer, name): linear for linear in model.linears() for name in linear.slices}


# ---- the step, as adapters see it ------------------------------------------------------------------------------
@dataclass
class StepItem:
    """One request's share of the step: flat rows row .. row + num_tokens - 1."""
    adapter: object | None          # its adapter handle (.kind, .slot, .info) or None for the base model
    row: int
    num_tokens: int
    first_layer: int                # AdapterDrop: the adapter acts in decoder layers >= first_layer only
    is_sampled: bool                # its last row is sampled (a lm_head row) this step
    # The sequence's adapter state: a dict runtimes may keep per-request values in across steps (gates taken
    # over the prompt at its first prefill), keyed by runtime name. It lives with the sequence (kept across
    # preemption, shared by its forked samples, dropped when it ends). None: runtimes keep nothing.
    state: dict | None = None
    start: int = 0                  # tokens of the sequence computed before this step (its first row's index)
    # flat KV-cache rows (block * block_size + offset) of its virtual tokens when they are its own copies
    # (`whole_prompt` kinds with a prefix: a gated prefix scales them), else None
    virtual_slots: list[int] | None = None


@dataclass
class StepLayout:
    items: list[StepItem]           # in batch order (tokens of one adapter contiguous, base requests first)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    def slots_of(self, kinds) -> tuple[list[int | None], list[int], list[int | None]]:
        """Per token: the slot of its adapter if that is of one of `kinds` or has a part of one of them (a union
        adapter, else None) and its first layer; per sampled row: the slot (None likewise)."""
        token_slots: list[int | None] = []
        token_first: list[int] = []
        sample_slots: list[int | None] = []
        for item in self.items:
            adapter = item.adapter
            slot = adapter.slot if adapter is not None and has_kind(adapter, kinds) else None
            token_slots.extend([slot] * item.num_tokens)
            token_first.extend([item.first_layer] * item.num_tokens)
            if item.is_sampled:
                sample_slots.append(slot)
        return token_slots, token_first, sample_slots


def has_kind(adapter, kinds) -> bool:
    """Whether adapter handle `adapter` is of one of `kinds`, or a union adapter with a part of one of them."""
    return adapter.kind in kinds or any(part in kinds for part in adapter.info.get("part_kinds", ()))


@dataclass
class StepHooks:
    """The hooks of this step's active runtimes (those with a view), grouped by hook point; built once per step."""
    embed: list[Callable] = field(default_factory=list)
    linear_input: list[Callable] = field(default_factory=list)
    linear: list[Callable] = field(default_factory=list)
    native_linear: list[Callable] = field(default_factory=list)
    sublayer: list[Callable] = field(default_factory=list)
    kv: list[Callable] = field(default_factory=list)

    def add(self, runtime: AdapterRuntime) -> None:
        for point in ("embed", "linear_input", "linear", "native_linear", "sublayer", "kv"):
            hook = getattr(runtime, f"on_{point}")
            if hook is not None:
                getattr(self, point).append(hook)


# ---- K/V contributions (data; the engine stores them) -----------------------------------------------------------
@dataclass
class PrefixKV:
    """Every layer's keys and values for n virtual tokens, written as they are into the cache (no RoPE).
    `first_position`: the RoPE position of the request's first own token: None = n, after the virtual tokens
    (PEFT); 0 for AdapterHub, whose prefix is concatenated to the keys of a model whose positions start at 0.
    Either way the request's tokens attend every virtual token."""
    key: torch.Tensor        # [num_layers, n, num_kv_heads, head_dim]
    value: torch.Tensor      # [num_layers, n, num_kv_heads, head_dim]
    first_position: int | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.key.shape[1]

    @property
    def num_bytes(self) -> int:
        return 2 * self.key.numel() * self.key.element_size()


@dataclass
class VirtualTokens:
    """n input embeddings that precede the request's tokens (positions 0..n-1); the engine runs the model on
    them once to get their K/V."""
    embeddings: torch.Tensor     # [n, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_bytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


# ---- what a runtime implements ---------------------------------------------------------------------------------
class AdapterRuntime:
    """One adapter family on the running model. Subclasses set `name`, `kinds`, implement `load`, `install`,
    `remove`, and the hooks they need (a hook left None is never called).

    Slots are global (adapters/registry.py): slot s holds one adapter of one kind at a time; a runtime keeps
    per-slot state only for its own adapters.
    """
    name: str = ""                  # key of its per-step view in meta.adapters
    kinds: tuple[str, ...] = ()     # adapter kinds (adapters.config.detect_kind) it serves
    evictable: bool = True          # False: installed at load, never evicted (a request binds to it when added)
    # Kinds whose requests keep values taken over the whole prompt (StepItem.state): the engine prefills such
    # a request's prompt in one chunk when it has no state yet, and keeps its KV out of the prefix cache.
    whole_prompt_kinds: tuple[str, ...] = ()

    def load(self, path: str) -> object:
        """Read and validate a checkpoint into this kind's weights container (any thread, no shared state).
        The container's `num_bytes` is its device cost; `rank` / `num_virtual_tokens` / `first_position` /
        `part_kinds`, when present, are kept while the weights are on disk. AdapterError for anything that
        cannot be served exactly."""
        raise NotImplementedError

    # load_part(path, config, tensors, source) -> weights: the part of a union adapter (adapters/union.py) this
    # runtime serves, from its sub-config `config` (one of the union's "configs"; `source` names it in errors) and
    # the checkpoint's tensors not yet claimed by another part, popping those it uses out of `tensors`.
    # None: the runtime serves no union parts.
    load_part: Callable | None = None

    def install(self, slot: int, weights) -> None:
        """Put `weights` into `slot` of this runtime's device state (engine thread, between steps)."""

    def remove(self, slot: int) -> None:
        """Clear `slot` (also after a failed install: must not raise for a half-installed slot)."""

    def bind(self, registry) -> None:
        """Called once with the engine's adapter registry (adapters/registry.py), before any load: for kinds built
        on other loaded adapters (AdapterFusion resolves its members by name). Most runtimes ignore it."""

    def virtual_kv(self, weights) -> PrefixKV | VirtualTokens | None:
        """Virtual tokens every request of this adapter attends (prefix / prompt tuning), as data: the engine
        allocates shared KV blocks for them at install and writes them. None: none."""
        return None

    def step_view(self, layout: StepLayout) -> object | None:
        """This runtime's per-step view (segments by slot, gathered vectors, ...) built once from the step's
        layout, or None when none of the step's tokens use it (then none of its hooks is called)."""
        return None

    # on_embed(h [T, hidden], meta) -> None: add to the rows of its tokens in place.
    on_embed: Callable | None = None
    # on_linear_input(x [N, in], meta, linear: LinearSite) -> x': the input the matmul uses (a new tensor; x
    # is not modified). N = T, or the sampled rows for the lm_head (linear.layer == num_layers).
    on_linear_input: Callable | None = None
    # on_linear(x [N, in], y [N, out], meta, linear: LinearSite) -> None: y = x @ W.T (+ b) modified in place
    # for its tokens; x is the input the matmul used.
    on_linear: Callable | None = None
    # on_native_linear(meta, linear: LinearSite) -> list of ops | None: on_linear's delta for this step as
    # kernels/decode_layers LoRA ops (tuples in its OP_* order), which run inside that kernel's whole-stack decode;
    # None when they cannot (then the model runs its layers one by one, calling on_linear). A runtime with on_linear
    # and without this keeps every step on the module path.
    on_native_linear: Callable | None = None
    # on_sublayer(name, x, residual, out, h, meta, layer) -> None, after sub-layer `name` (ATTENTION / MLP) of
    # decoder layer `layer` (layer.layer: its index; layer.input_layernorm, layer.post_attention_layernorm:
    # the RMSNorms, callables [N, hidden] -> [N, hidden]); all tensors [T, hidden]:
    #     x         the sub-layer's input after its pre-norm (input_layernorm(residual) for ATTENTION,
    #               post_attention_layernorm(residual) for MLP)
    #     residual  the sub-layer's input before the norm (the residual stream entering it)
    #     out       the sub-layer's output (o_proj / down_proj output), before the residual add
    #     h         residual + out: what the layer passes on; the hook overwrites its own tokens' rows in place
    #               (Houlsby / Pfeiffer / parallel bottleneck adapters: h[rows] = f(out, residual)[rows])
    # Hooks must not modify x, residual or out.
    on_sublayer: Callable | None = None
    # on_kv(x [T, hidden], k_cache, v_cache, meta, layer: int) -> None, in decoder layer `layer`'s attention after
    # q / k / v are computed and before the KV cache is written and read; x is the attention's input (after
    # input_layernorm); k_cache, v_cache: that layer's [num_blocks, block_size, num_kv_heads, head_dim], which the
    # hook may modify in the rows of its requests' own virtual tokens (StepItem.virtual_slots) only.
    on_kv: Callable | None = None
