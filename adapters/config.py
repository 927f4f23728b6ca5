"""`adapter_config.json` -> typed config, and which kind of adapter a directory holds.

PEFT writes one flat JSON object with a `peft_type` ("LORA", "ADALORA", "PREFIX_TUNING", ...). AdapterHub's
`adapters` library writes {"config": {...method options...}, "name": ..., "model_type": ..., "version": ...} and
no `peft_type`. Every config class here reads its JSON with `from_dict`: missing required fields are named in
the error, unknown fields are ignored (each PEFT release adds some).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

CONFIG_NAME = "adapter_config.json"
FUSION_CONFIG_NAME = "adapter_fusion_config.json"     # AdapterHub's save_adapter_fusion (no adapter_config.json)

# What detect_kind returns: the runtime that serves the adapter. LoRA, DoRA (LORA with use_dora) and AdaLoRA
# all load into LoRA tensors (adapters/lora.py), so they share "lora".
LORA = "lora"
PREFIX_TUNING = "prefix_tuning"
PROMPT_TUNING = "prompt_tuning"
P_TUNING = "p_tuning"
IA3 = "ia3"
BOTTLENECK = "bottleneck"
BOTTLENECK_GATED = "bottleneck_gated"  # AdapterHub bottleneck with use_gating (UniPELT's SeqBn), gate taken at prefill
ADAPTERHUB_IA3 = "adapterhub_ia3"      # AdapterHub's IA3Config: architecture "lora", composition_mode "scale"
ADAPTERHUB_LORA = "adapterhub_lora"    # AdapterHub's LoRAConfig: architecture "lora", composition_mode "add"
ADAPTERHUB_LORA_GATED = "adapterhub_lora_gated"   # the same with use_gating (UniPELT's gate, taken at prefill)
BITFIT = "bitfit"                      # our format (README "BitFit adapters"): peft_type "BITFIT"
ADAPTERHUB_FUSION = "adapterhub_fusion"  # AdapterHub AdapterFusion over loaded bottleneck adapters (fusion.py)
ADAPTERHUB_PREFIX = "adapterhub_prefix"    # AdapterHub's PrefixTuningConfig: architecture "prefix_tuning"
ADAPTERHUB_PREFIX_GATED = "adapterhub_prefix_gated"   # the same with use_gating (UniPELT), gate taken at prefill
ADAPTERHUB_UNION = "adapterhub_union"      # AdapterHub's ConfigUnion (MAM, ...): architecture "union"

PEFT_KINDS = {"LORA": LORA, "ADALORA": LORA, "PREFIX_TUNING": PREFIX_TUNING, "PROMPT_TUNING": PROMPT_TUNING,
              "P_TUNING": P_TUNING, "IA3": IA3, "BITFIT": BITFIT}

# LoraConfig options that change the math in ways our LoRA tensors cannot express -> why we refuse them.
UNSUPPORTED_LORA_OPTIONS = {
    "fan_in_fan_out": "is for GPT-2 style Conv1D weights; Llama/Mistral/Qwen2 use nn.Linear",
    "lora_bias": "adds a trained bias to lora_B",
    "modules_to_save": "replaces whole base modules with trained copies",
    "layer_replication": "duplicates base layers",
    "trainable_token_indices": "trains individual embedding rows",
    "target_parameters": "targets raw nn.Parameters (MoE experts), not linear layers",
    "alora_invocation_tokens": "activated LoRA applies the adapter only after invocation tokens",
    "use_qalora": "QA-LoRA pools the input in groups",
    "velora_config": "is a LoRA variant with a different forward",
    "monteclora_config": "is a LoRA variant with a different forward",
    "use_bdlora": "is a LoRA variant with a different forward",
    "arrow_config": "routes tokens between LoRA experts",
    "kasa_config": "is a LoRA variant with a different forward",
}
# init_lora_weights values whose initialisation rewrote the base weights (W_res = W - B0 @ A0): the adapter only
# works on that modified base unless it was converted at save time (path_initial_model_for_weight_conversion).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterError(ValueError):
    """A bad or unsupported adapter directory; the message says which file and what is wrong."""


@dataclass(kw_only=True)
class _FromDict:
    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG_NAME):
        if not isinstance(d, dict):
            raise AdapterError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if d.get(n) is None]
        if missing:
            raise AdapterError(f"{source}: missing required field(s): {', '.join(missing)}")
        known = {k: v for k, v in d.items() if k in names and v is not None}
        try:
            return cls(**known)
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{source}: {e}") from None


@dataclass(kw_only=True)
class LoraConfig(_FromDict):
    """PEFT LoraConfig (peft_type LORA), the fields that decide which modules carry LoRA and how it scales."""
    peft_type: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str            # names, or one regex full-matched against module paths
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None    # recorded only: a different base is not an error by itself
    task_type: str | None = None
    unsupported: dict[str, Any] = field(default_factory=dict)   # set options from UNSUPPORTED_LORA_OPTIONS

    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG_NAME):
        config = super().from_dict(d, source)
        config.unsupported = {k: d[k] for k in UNSUPPORTED_LORA_OPTIONS if d.get(k) not in (None, False, [], {})}
        return config

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.target_modules, (list, str)):
            raise ValueError(f"target_modules must be a list or a regex string, got {self.target_modules!r}")
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be a non-negative integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        layers = self.layers_to_transform
        if isinstance(layers, bool) or not isinstance(layers, (int, list, type(None))):
            raise ValueError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")

    @property
    def is_adalora(self) -> bool:
        return False

    def targets(self, module: str) -> bool:
        """Whether PEFT 0.21 puts an adapter on `module` (a path like "model.layers.0.self_attn.q_proj").

        Mirrors peft.tuners.tuners_utils.check_target_module_exists: a regex string is full-matched; a list
        matches a path exactly or by a ".name" suffix, and only suffix matches are filtered by
        layers_to_transform (the layer index is the first number after `layers_pattern`, or after any
        dotted segment when it is unset). "all-linear" means every linear except the output head.
        """
        if self._excluded(module):
            return False
        targets = self.target_modules
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                return module != "lm_head" and not module.endswith("embed_tokens")
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        if not any(module.endswith(f".{t}") for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        index = _layer_index(module, self.layers_pattern)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def _excluded(self, module: str) -> bool:
        exclude = self.exclude_modules
        if isinstance(exclude, str):
            return re.fullmatch(exclude, module) is not None
        return bool(exclude) and (module in exclude or any(module.endswith(f".{e}") for e in exclude))

    def rank_for(self, module: str) -> int:
        """LoRA rank PEFT gives `module`: the first rank_pattern key matching it (as a regex suffix), else r."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)

    def alpha_for(self, module: str) -> float:
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)


@dataclass(kw_only=True)
class AdaLoraConfig(LoraConfig):
    """PEFT AdaLoraConfig (peft_type ADALORA). `r` is ignored by PEFT; every module starts at `init_r`.

    rank_pattern here is AdaLoRA's own: {"model.layers.0.self_attn.q_proj.lora_E": [True, False, ...]}, one
    bool per initial rank (False = pruned), written at save time; the saved tensors keep only the True ranks.
    """
    init_r: int
    r: int = 8
    target_r: int | None = None
    total_step: int | None = None

    @property
    def is_adalora(self) -> bool:
        return True

    def rank_for(self, module: str) -> int:
        mask = self.rank_mask(module)
        return self.init_r if mask is None else sum(bool(m) for m in mask)

    def rank_mask(self, module: str) -> list[bool] | None:
        mask = (self.rank_pattern or {}).get(f"{module}.lora_E")
        return None if mask is None else [bool(m) for m in mask]

    def alpha_for(self, module: str) -> float:
        return self.lora_alpha


@dataclass(kw_only=True)
class PromptLearningConfig(_FromDict):
    """PEFT prefix tuning, prompt tuning and P-tuning: virtual tokens added to the input or to every layer."""
    peft_type: str
    num_virtual_tokens: int
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prefix_projection: bool = False               # PREFIX_TUNING: an MLP re-parameterises the prefix
    encoder_hidden_size: int | None = None
    encoder_reparameterization_type: str | None = None   # P_TUNING: "MLP" or "LSTM"
    prompt_tuning_init: str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None


@dataclass(kw_only=True)
class IA3Config(_FromDict):
    """PEFT (IA)^3: learned per-feature scales on target modules (inputs of feedforward ones, else outputs)."""
    peft_type: str
    target_modules: list[str] | str
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None


@dataclass(kw_only=True)
class BitFitConfig(_FromDict):
    """BitFit (our format, adapters/bitfit.py): fine-tuned biases of linear layers, which replace the base's.
    `target_modules` (optional, matched like LoRA's): the modules that may carry a bias; None = any."""
    peft_type: str
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None


@dataclass(kw_only=True)
class BottleneckConfig(_FromDict):
    """An AdapterHub (`adapters` library) bottleneck adapter; `config` holds its method options
    (mh_adapter, output_adapter, reduction_factor, non_linearity, ...)."""
    config: dict
    name: str | None = None
    model_name: str | None = None
    model_type: str | None = None
    model_class: str | None = None
    hidden_size: int | None = None
    version: str | None = None


CONFIG_CLASSES = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig, "PREFIX_TUNING": PromptLearningConfig,
                  "PROMPT_TUNING": PromptLearningConfig, "P_TUNING": PromptLearningConfig, "IA3": IA3Config,
                  "BITFIT": BitFitConfig}


def pattern_key(patterns: dict, module: str) -> str:
    """PEFT's get_pattern_key: the first key K (in dict order) with re.match(rf"(.*\\.)?({K})$", module).

    Keys are regexes matched at a dotted-suffix boundary: for module "model.layers.1.self_attn.k_proj",
    "k_proj", "self_attn.k_proj" and "layers.1.self_attn.k_proj" match, "proj" and "1.self_attn.k" do not.
    Returns `module` itself when nothing matches (then `patterns.get` falls back to the default).
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _layer_index(module: str, layers_pattern) -> int | None:
    if not layers_pattern:
        # lazy: the first numbered segment ("model.layers.3.mlp" -> 3), not a nested one (MoE experts)
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m["idx"]) if m else None


def read_config_json(adapter_dir: str) -> dict:
    """The parsed adapter_config.json of `adapter_dir` (a JSON object), or AdapterError saying why not."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"{adapter_dir}: not a directory")
    if not os.path.isfile(path):
        raise AdapterError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT or AdapterHub adapter directory)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: malformed JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot read: {e}") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _is_adapterhub(d: dict) -> bool:
    return "peft_type" not in d and isinstance(d.get("config"), dict) and any(
        k in d for k in ("name", "version", "model_type", "model_name"))


def is_fusion_dir(adapter_dir: str) -> bool:
    """An AdapterHub fusion directory: adapter_fusion_config.json and no adapter_config.json."""
    return (os.path.isfile(os.path.join(adapter_dir, FUSION_CONFIG_NAME))
            and not os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)))


def adapterhub_kind(config: dict, source: str = CONFIG_NAME) -> str:
    """The kind serving an AdapterHub method config (an adapter_config.json's "config", or one of a union's
    "configs"): BOTTLENECK(_GATED), ADAPTERHUB_IA3, ADAPTERHUB_LORA(_GATED), ADAPTERHUB_PREFIX(_GATED) or
    ADAPTERHUB_UNION;
    AdapterError for others."""
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: an AdapterHub method config must be a JSON object, got {config!r}")
    arch = config.get("architecture")
    if arch in (None, "bottleneck"):
        return BOTTLENECK_GATED if config.get("use_gating") else BOTTLENECK
    if arch == "lora" and config.get("composition_mode") == "scale":
        return ADAPTERHUB_IA3
    if arch == "lora" and config.get("composition_mode", "add") == "add":
        return ADAPTERHUB_LORA_GATED if config.get("use_gating") else ADAPTERHUB_LORA
    if arch == "prefix_tuning":
        return ADAPTERHUB_PREFIX_GATED if config.get("use_gating") else ADAPTERHUB_PREFIX
    if arch == "union":
        return ADAPTERHUB_UNION
    mode = f" with composition_mode {config.get('composition_mode')!r}" if arch == "lora" else ""
    raise AdapterError(f"{source}: AdapterHub adapter with architecture {arch!r}{mode} is not supported "
                       f"(served: bottleneck adapters, LoRA, (IA)^3, prefix tuning and unions of these (MAM, "
                       f"UniPELT))")


def detect_kind(adapter_dir: str) -> str:
    """LORA (LoRA, DoRA, AdaLoRA), PREFIX_TUNING, PROMPT_TUNING, P_TUNING, IA3, or for AdapterHub checkpoints
    BOTTLENECK (SeqBn / DoubleSeqBn / ParBn), BOTTLENECK_GATED, ADAPTERHUB_IA3, ADAPTERHUB_LORA(_GATED),
    ADAPTERHUB_PREFIX(_GATED) or ADAPTERHUB_UNION; a directory with only an adapter_fusion_config.json is
    ADAPTERHUB_FUSION."""
    if is_fusion_dir(adapter_dir):
        return ADAPTERHUB_FUSION
    d = read_config_json(adapter_dir)
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if _is_adapterhub(d):
        return adapterhub_kind(d["config"], path)
    peft_type = d.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{path}: no peft_type field (and not an AdapterHub adapter config)")
    kind = PEFT_KINDS.get(str(peft_type).upper())
    if kind is None:
        raise AdapterError(f"{path}: unsupported peft_type {peft_type!r}; supported: {', '.join(PEFT_KINDS)}")
    return kind


def load_config(adapter_dir: str):
    """The typed config of `adapter_dir`: LoraConfig, AdaLoraConfig, PromptLearningConfig, IA3Config or
    BottleneckConfig."""
    kind = detect_kind(adapter_dir)
    d = read_config_json(adapter_dir)
    source = os.path.join(adapter_dir, CONFIG_NAME)
    if kind in (BOTTLENECK, BOTTLENECK_GATED, ADAPTERHUB_IA3, ADAPTERHUB_LORA, ADAPTERHUB_LORA_GATED,
                ADAPTERHUB_PREFIX, ADAPTERHUB_PREFIX_GATED, ADAPTERHUB_UNION):
        return BottleneckConfig.from_dict(d, source)
    return CONFIG_CLASSES[str(d["peft_type"]).upper()].from_dict(d, source)
