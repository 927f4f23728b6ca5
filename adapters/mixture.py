"""Per-request LoRA mixtures (LoRAX's `merged_adapters`): several LoRA adapters combined into one new LoRA
adapter, computed exactly as PEFT 0.21's `LoraModel.add_weighted_adapter` would, and written as an ordinary PEFT
checkpoint (adapter_config.json + adapter_model.safetensors) that the registry then serves like any adapter.

Which combination works on what (PEFT's split, which we follow; LoRAX's own merge differs, see the README):
    linear, ties, dare_linear, dare_ties, magnitude_prune   the A and B matrices separately, member by member:
        A = op([A_i], sign_i * sqrt(|w_i * s_i|)),  B = op([B_i], sqrt(|w_i * s_i|))   (s_i: alpha / r of member
        i at that module); needs every member at the same rank r, and the result has rank r.
    cat                                                      A = [w_0 s_0 A_0; w_1 s_1 A_1; ...], B = [B_0 B_1 ...]:
        exact sum of the members' deltas, rank = the sum of their ranks.
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd   the full deltas dW_i = s_i B_i @ A_i
        combined with the op, then cut back to rank `svd_rank` (default: the members' largest rank) by SVD.
The new adapter is member 0's config with r = lora_alpha = the new rank (scaling 1; sqrt(r) with rsLoRA),
rank / alpha patterns cleared, and target_modules the union of the members'. DARE's random masks come from a
torch.Generator seeded with the recipe's `seed`, drawn in PEFT's order (modules in the model's order, then for
each module A's members, then B's), so one recipe always gives one adapter.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass

import torch

from adapters import merge_ops
from adapters.checkpoint import WEIGHTS_NAME, read_safetensors
from adapters.config import CONFIG_NAME, AdapterError, LoraConfig, load_config, read_config_json
from adapters.model_spec import ModelSpec

RECIPE_NAME = "mixture.json"              # the recipe, written next to the mixture's checkpoint
LORAX_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
PEFT_STRATEGIES = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
                   "magnitude_prune_svd")
STRATEGIES = LORAX_STRATEGIES + PEFT_STRATEGIES
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
USES_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune_svd"}
USES_SIGN = {"ties", "dare_ties", "ties_svd", "dare_ties_svd"}
RANDOM = {"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"}
SIGN_METHODS = ("total", "frequency")
MAX_MEMBERS = 16
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
PREFIX = "base_model.model."


class MixtureError(AdapterError):
    """A recipe that cannot be mixed (HTTP 400); the message says which field or member and why."""

    def __init__(self, message: str, param: str = "merged_adapters"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MixtureRecipe:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    merge_strategy: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0                      # DARE's random masks
    svd_rank: int | None = None        # *svd strategies: rank of the result (default: the members' largest)

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.ids:
            raise MixtureError("merged_adapters.ids is empty", "merged_adapters.ids")
        if len(self.ids) > MAX_MEMBERS:
            raise MixtureError(f"merged_adapters.ids names {len(self.ids)} adapters; at most {MAX_MEMBERS}",
                               "merged_adapters.ids")
        if len(self.weights) != len(self.ids):
            raise MixtureError(f"merged_adapters: {len(self.ids)} ids but {len(self.weights)} weights (one weight "
                               f"per adapter)", "merged_adapters.weights")
        if not all(math.isfinite(w) for w in self.weights):
            raise MixtureError("merged_adapters.weights must be finite numbers", "merged_adapters.weights")
        if self.merge_strategy not in STRATEGIES:
            raise MixtureError(f"merged_adapters.merge_strategy {self.merge_strategy!r} is not one of "
                               f"{', '.join(STRATEGIES)}", "merged_adapters.merge_strategy")
        if self.merge_strategy in USES_DENSITY:
            if self.density is None:
                raise MixtureError(f"merged_adapters.density is required with merge_strategy "
                                   f"{self.merge_strategy!r}", "merged_adapters.density")
            if not 0 < self.density <= 1:
                raise MixtureError(f"merged_adapters.density must be in (0, 1], got {self.density}",
                                   "merged_adapters.density")
        if self.majority_sign_method not in SIGN_METHODS:
            raise MixtureError(f"merged_adapters.majority_sign_method {self.majority_sign_method!r} is not one of "
                               f"{', '.join(SIGN_METHODS)}", "merged_adapters.majority_sign_method")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise MixtureError(f"merged_adapters.svd_rank must be >= 1, got {self.svd_rank}",
                               "merged_adapters.svd_rank")

    @property
    def strategy(self) -> str:
        """What PEFT runs: with one member, always linear."""
        return "linear" if len(self.ids) == 1 else self.merge_strategy

    def canonical(self) -> dict:
        """The fields that change the result (density only where it is used, ...): equal recipes, equal dicts."""
        s = self.strategy
        out = {"ids": list(self.ids), "weights": list(self.weights), "merge_strategy": s}
        if s in USES_DENSITY:
            out["density"] = float(self.density)
        if s in USES_SIGN:
            out["majority_sign_method"] = self.majority_sign_method
        if s in RANDOM and self.density < 1:
            out["seed"] = int(self.seed)
        if s.endswith("svd") and self.svd_rank is not None:
            out["svd_rank"] = int(self.svd_rank)
        return out

    @property
    def name(self) -> str:
        """"mixture-" + 16 hex digits of the canonical recipe's SHA-256: its registry name."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return "mixture-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Member:
    name: str
    path: str
    config: LoraConfig
    raw_config: dict
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]    # module path -> (A [r, in], B [out, r]) fp32

    @property
    def max_rank(self) -> int:
        """PEFT's rank for the rank check: r, or the largest of r and rank_pattern's values."""
        return max(self.config.r, *self.config.rank_pattern.values()) if self.config.rank_pattern else self.config.r

    def scaling(self, module: str) -> float:
        rank, alpha = self.config.rank_for(module), self.config.alpha_for(module)
        return alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank


def module_order(spec: ModelSpec) -> list[str]:
    """The HF module paths LoRA can sit on, in `named_modules()` order (the order PEFT draws DARE masks in)."""
    layers = [f"model.layers.{i}.{block}.{name}" for i in range(spec.num_layers) for block, name in LINEARS]
    return ["model.embed_tokens", *layers, "lm_head"]


def read_member(name: str, path: str) -> _Member:
    """A LoRA (or rsLoRA, rank/alpha-pattern) adapter's raw PEFT tensors, as PEFT holds them before merging.
    MixtureError for kinds add_weighted_adapter cannot mix."""
    try:
        config = load_config(path)
    except AdapterError as exc:
        raise MixtureError(f"merged_adapters: {name!r}: {exc}", "merged_adapters.ids") from None
    why = ("it is not a LoRA adapter" if not isinstance(config, LoraConfig) else
           "AdaLoRA adapters cannot be mixed" if config.is_adalora else
           "DoRA adapters cannot be mixed (PEFT's add_weighted_adapter keeps member 0's magnitudes)"
           if config.use_dora else None)
    if why:
        raise MixtureError(f"merged_adapters: {name!r} ({path}): {why}; mixtures take LoRA adapters",
                           "merged_adapters.ids")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_safetensors(path).items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                             (".lora_embedding_B", "B")):
            if rest.endswith(suffix):
                modules.setdefault(rest[:-len(suffix)], {})[part] = tensor.float()
                break
    pairs = {m: (p["A"], p["B"]) for m, p in modules.items() if "A" in p and "B" in p}
    return _Member(name, path, config, read_config_json(path), pairs)


def mix(recipe: MixtureRecipe, members: list[_Member], spec: ModelSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, adapter_model.safetensors tensors) of PEFT's add_weighted_adapter(
    [member names], recipe.weights, combination_type=recipe.strategy, ...) over `members`."""
    strategy = recipe.strategy
    ranks = [m.max_rank for m in members]
    if strategy in SAME_RANK:
        if len(set(ranks)) != 1:
            raise MixtureError(f"merged_adapters: merge_strategy {strategy!r} needs adapters of one rank, got "
                               + ", ".join(f"{m.name!r} r={r}" for m, r in zip(members, ranks))
                               + " (cat or svd strategies take mixed ranks)", "merged_adapters.ids")
        new_rank = ranks[0]
    elif strategy == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = recipe.svd_rank or max(ranks)
    config = _new_config(members, new_rank)
    new_scaling = math.sqrt(new_rank) if config["use_rslora"] else 1.0
    targets = LoraConfig.from_dict(config)
    generator = torch.Generator().manual_seed(recipe.seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in module_order(spec):
        if not targets.targets(module):
            continue
        present = [(m, w) for m, w in zip(members, recipe.weights) if module in m.modules]
        if not present:
            raise MixtureError(f"merged_adapters: the mixture targets {module} (target_modules "
                               f"{config['target_modules']!r}, layers of {members[0].name!r}) but no member has "
                               f"LoRA weights there", "merged_adapters.ids")
        if strategy == "cat":
            a, b = _cat(present, module, new_rank)
        elif strategy in SAME_RANK:
            a, b = _task_arithmetic_ab(strategy, present, module, recipe, generator)
        else:
            a, b = _svd(strategy, present, module, recipe, generator, new_rank)
        if a.shape[0] != new_rank:     # PEFT keeps the tensors' own rank at this module, at scaling `new_scaling`
            key = re.escape(module)
            config["rank_pattern"][key] = a.shape[0]
            config["alpha_pattern"][key] = new_scaling * (math.sqrt(a.shape[0]) if config["use_rslora"]
                                                          else a.shape[0])
        embed = module.endswith("embed_tokens")
        tensors[PREFIX + module + (".lora_embedding_A" if embed else ".lora_A.weight")] = a.contiguous()
        tensors[PREFIX + module + (".lora_embedding_B" if embed else ".lora_B.weight")] = b.contiguous()
    return config, tensors


def _new_config(members: list[_Member], new_rank: int) -> dict:
    kinds = {type(m.raw_config.get("target_modules")) for m in members}
    if len(kinds) != 1 or kinds.pop() not in (list, str):
        raise MixtureError("merged_adapters: the adapters' target_modules mix lists and regex strings (PEFT "
                           "cannot mix those)", "merged_adapters.ids")
    if isinstance(members[0].raw_config["target_modules"], str):
        targets = "|".join(f"({m.raw_config['target_modules']})" for m in members)
    else:
        targets = sorted({t for m in members for t in m.raw_config["target_modules"]})
    config = dict(members[0].raw_config)
    config.update(peft_type="LORA", r=new_rank, lora_alpha=new_rank, target_modules=targets, rank_pattern={},
                  alpha_pattern={}, use_rslora=bool(config.get("use_rslora", False)))
    return config


def _task_arithmetic_ab(strategy, present, module, recipe, generator):
    ranks = {m.modules[module][0].shape[0] for m, _ in present}
    if len(ranks) != 1:
        raise MixtureError(f"merged_adapters: at {module} the adapters have ranks {sorted(ranks)}; merge_strategy "
                           f"{strategy!r} needs one", "merged_adapters.ids")
    weights_a, weights_b = [], []
    for member, weight in present:
        scaled = weight * member.scaling(module)
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)        # the sign on one side only
        weights_b.append(math.sqrt(abs(scaled)))
    out = []
    for part, weights in ((0, weights_a), (1, weights_b)):
        out.append(merge_ops.combine(strategy, [m.modules[module][part] for m, _ in present], torch.tensor(weights),
                                     recipe.density, recipe.majority_sign_method, generator))
    return out[0], out[1]


def _cat(present, module, new_rank):
    a = torch.cat([m.modules[module][0] * w * m.scaling(module) for m, w in present], dim=0)
    b = torch.cat([m.modules[module][1] for m, _ in present], dim=1)
    a_full = torch.zeros(new_rank, a.shape[1])              # ranks of members absent here stay zero
    b_full = torch.zeros(b.shape[0], new_rank)
    a_full[:a.shape[0]] = a
    b_full[:, :b.shape[1]] = b
    return a_full, b_full


def _svd(strategy, present, module, recipe, generator, new_rank):
    embed = module.endswith("embed_tokens")
    deltas = []
    for member, _ in present:
        a, b = member.modules[module]
        delta = (b @ a) * member.scaling(module)
        deltas.append(delta.T if embed else delta)            # PEFT's get_delta_weight layout
    weights = torch.tensor([w for _, w in present])
    kind = strategy.removesuffix("_svd")
    delta = merge_ops.combine("linear" if kind == "svd" else kind, deltas, weights, recipe.density,
                              recipe.majority_sign_method, generator)
    if embed:
        delta = delta.T
    if new_rank > min(delta.shape):
        raise MixtureError(f"merged_adapters: svd_rank {new_rank} exceeds {module}'s size {tuple(delta.shape)}",
                           "merged_adapters.svd_rank")
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    return vh[:new_rank, :], u


def write_mixture(out_dir: str, recipe: MixtureRecipe, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME))
    with open(os.path.join(out_dir, RECIPE_NAME), "w") as f:
        json.dump({"name": recipe.name, **asdict(recipe), "canonical": recipe.canonical()}, f, indent=1)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:     # last: its presence marks a complete adapter
        json.dump(config, f, indent=1)
    return out_dir


def make_mixture(recipe: MixtureRecipe, member_paths: list[str], spec: ModelSpec, out_dir: str) -> str:
    """Read the members (paths in recipe.ids order), mix, write the PEFT checkpoint to `out_dir`; returns it."""
    members = [read_member(name, path) for name, path in zip(recipe.ids, member_paths)]
    config, tensors = mix(recipe, members, spec)
    return write_mixture(out_dir, recipe, config, tensors)
