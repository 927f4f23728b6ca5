"""adapter_config.json parsing, kind detection, and PEFT 0.21's target / rank / alpha matching rules."""
from __future__ import annotations

import json

import peft
import pytest
import transformers
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from adapters.config import (ADAPTERHUB_LORA, BOTTLENECK, IA3, LORA, P_TUNING, PREFIX_TUNING, PROMPT_TUNING, AdaLoraConfig,
                             AdapterError, BottleneckConfig, IA3Config, LoraConfig, PromptLearningConfig,
                             detect_kind, load_config, pattern_key)
from tests.tiny_models import COMMON


def write(tmp_path, obj, name="a") -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(d)


def peft_saved(tmp_path, config, name) -> str:
    """The adapter_config.json PEFT itself writes for `config`."""
    d = tmp_path / name
    config.save_pretrained(d)
    return str(d)


def test_from_dict_names_missing_fields_and_ignores_unknown():
    with pytest.raises(AdapterError, match=r"missing required field\(s\): r, lora_alpha, target_modules"):
        LoraConfig.from_dict({"peft_type": "LORA"})
    config = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                   "rank_pattern": None, "brand_new_option": 3})
    assert config.r == 4 and config.rank_pattern == {} and not hasattr(config, "brand_new_option")
    with pytest.raises(AdapterError, match="init_r"):
        AdaLoraConfig.from_dict({"peft_type": "ADALORA", "lora_alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(AdapterError, match="target_modules must be"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": 3})


@pytest.mark.parametrize("config, kind, cls", [
    (peft.LoraConfig(r=4, target_modules=["q_proj"]), LORA, LoraConfig),
    (peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), LORA, LoraConfig),
    (peft.AdaLoraConfig(init_r=6, total_step=10, target_modules=["q_proj"]), LORA, AdaLoraConfig),
    (peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), PREFIX_TUNING, PromptLearningConfig),
    (peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), PROMPT_TUNING, PromptLearningConfig),
    (peft.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16, task_type="CAUSAL_LM"), P_TUNING,
     PromptLearningConfig),
    (peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), IA3, IA3Config),
], ids=["lora", "dora", "adalora", "prefix", "prompt", "p_tuning", "ia3"])
def test_detect_kind_on_peft_written_configs(config, kind, cls, tmp_path):
    path = peft_saved(tmp_path, config, "a")
    assert detect_kind(path) == kind
    typed = load_config(path)
    assert type(typed) is cls
    if isinstance(typed, LoraConfig):
        assert typed.use_dora == getattr(config, "use_dora", False)
    if isinstance(typed, PromptLearningConfig):
        assert typed.num_virtual_tokens == 5


ADAPTERHUB = {  # as the `adapters` library writes it for a SeqBn (Pfeiffer) adapter
    "config": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
               "original_ln_before": True, "residual_before_ln": True, "architecture": "bottleneck"},
    "hidden_size": 64, "model_class": "LlamaForCausalLM", "model_name": "tiny", "model_type": "llama",
    "name": "sentiment", "version": "adapters.1.1.0"}


def test_adapterhub_bottleneck(tmp_path):
    path = write(tmp_path, ADAPTERHUB)
    assert detect_kind(path) == BOTTLENECK
    config = load_config(path)
    assert isinstance(config, BottleneckConfig) and config.config["reduction_factor"] == 16
    old = dict(ADAPTERHUB, config={k: v for k, v in ADAPTERHUB["config"].items() if k != "architecture"})
    assert detect_kind(write(tmp_path, old, "old")) == BOTTLENECK
    lora = dict(ADAPTERHUB, config={"architecture": "lora", "r": 8, "alpha": 8})
    assert detect_kind(write(tmp_path, lora, "lora")) == ADAPTERHUB_LORA
    odd = dict(ADAPTERHUB, config={"architecture": "lora", "r": 8, "alpha": 8, "composition_mode": "mul"})
    with pytest.raises(AdapterError, match="architecture 'lora' with composition_mode 'mul' is not supported"):
        detect_kind(write(tmp_path, odd, "odd"))


@pytest.mark.parametrize("content, needle", [
    (None, "no adapter_config.json"),
    ('{"peft_type": "LORA", "r": 4,', "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"peft_type": "LOHA", "r": 4}, "unsupported peft_type 'LOHA'"),
    ({"r": 4, "target_modules": ["q_proj"]}, "no peft_type"),
    (b"\xff\xfe{", "cannot read"),
])
def test_config_errors(content, needle, tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    if isinstance(content, bytes):
        (d / "adapter_config.json").write_bytes(content)
    elif content is not None:
        (d / "adapter_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AdapterError, match=needle) as err:
        detect_kind(str(d))
    assert str(d) in str(err.value)
    with pytest.raises(AdapterError):
        detect_kind(str(tmp_path / "missing"))


MODULE_PATHS = [f"model.layers.{i}.{block}.{name}" for i in (0, 1, 2, 11, 12)
                for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names]
MODULE_PATHS += ["lm_head", "model.embed_tokens", "model.layers.1.mlp", "model.norm"]

PATTERNS = [
    {"q_proj": 2, "down_proj": 3},
    {"layers.1.self_attn.k_proj": 6, "k_proj": 5},                 # dict order decides
    {"k_proj": 5, "layers.1.self_attn.k_proj": 6},
    {r"layers\.1\d?\.mlp\.(up|down)_proj": 7},
    {"^model.layers.0.mlp.gate_proj": 3, "proj": 9, "1.self_attn.k": 4, "_proj": 1},
    {"model.layers.1.self_attn.v_proj": 2, "lm_head": 8, "embed_tokens": 1},
]


@pytest.mark.parametrize("patterns", PATTERNS)
def test_pattern_key_is_peft_get_pattern_key(patterns):
    for path in MODULE_PATHS:
        assert pattern_key(patterns, path) == get_pattern_key(patterns.keys(), path), path


def test_rank_and_alpha_patterns():
    config = LoraConfig.from_dict({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"],
                                   "rank_pattern": {"down_proj": 2, "layers.1.self_attn.k_proj": 6},
                                   "alpha_pattern": {"gate_proj": 5}})
    assert config.rank_for("model.layers.0.mlp.down_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.k_proj") == 6
    assert config.rank_for("model.layers.11.self_attn.k_proj") == 16       # "layers.11" is not "layers.1"
    assert config.alpha_for("model.layers.0.mlp.gate_proj") == 5
    assert config.alpha_for("model.layers.0.mlp.up_proj") == 32


TARGET_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["o_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["o_proj", "up_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "k_proj"], layers_to_transform=[1]),
    dict(target_modules=r".*\.(q_proj|up_proj)"),
    dict(target_modules=r"model\.layers\.[01]\..*proj"),
    dict(target_modules=["q_proj", "gate_proj", "lm_head", "embed_tokens"], exclude_modules=["layers.1.mlp.gate_proj",
                                                                                             "lm_head"]),
    dict(target_modules=["q_proj", "up_proj"], exclude_modules=r".*layers\.2\..*"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[]),
]


@pytest.mark.parametrize("options", TARGET_CONFIGS, ids=range(len(TARGET_CONFIGS)))
def test_targets_is_peft_check_target_module_exists(options, tmp_path):
    reference = peft.LoraConfig(r=4, **options)
    ours = load_config(peft_saved(tmp_path, reference, "a"))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(COMMON, num_hidden_layers=3)))
    names = [n for n, _ in model.named_modules() if n] + MODULE_PATHS
    for name in names:
        assert ours.targets(name) == bool(check_target_module_exists(reference, name)), name


def test_all_linear_excludes_lm_head_and_embeddings():
    config = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    assert config.targets("model.layers.0.mlp.down_proj") and config.targets("model.layers.5.self_attn.q_proj")
    assert not config.targets("lm_head") and not config.targets("model.embed_tokens")
