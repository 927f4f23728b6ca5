"""Adapters on a 4-bit NF4 base (QLoRA serving) vs PEFT on transformers + bitsandbytes' 4-bit model of the same
weights: LoRA, rsLoRA, DoRA (its column norm from the dequantized weight, as PEFT), prefix tuning and prompt
tuning, each in one staggered mixed batch with base requests and alone: greedy tokens identical, logits 1e-4."""
from __future__ import annotations

from functools import cache

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from tests.peft_fixtures import greedy_full_forward, save_adapter
from tests.test_lora_vs_peft import BASE, peft_reference_plain, run_with_adapters
from tests.test_model_vs_hf import ATOL, MAX_NEW, hf_reference, make_prompts
from tests.tiny_models import load_hf_nf4

CONFIGS = {
    "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    "rslora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, init_lora_weights=False),
    "dora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"],
                       use_dora=True, init_lora_weights=False),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
}
PROMPT_KINDS = ("prefix", "prompt")
NAMES = ["dora", "lora", BASE, "prefix", "rslora", "prompt", "dora", "prefix"]
PROMPTS = make_prompts(31, [6, 11, 4, 9, 14, 3, 17, 8])
ARRIVALS = [0, 0, 0, 1, 2, 2, 3, 5]


class Setup:
    def __init__(self, base, root, double_quant: bool):
        self.base, self.double_quant = base, double_quant
        self.dirs = {name: save_adapter(base, cfg, root / name, seed=40 + i) for i, (name, cfg) in
                     enumerate(CONFIGS.items())}

    @cache
    def model(self, name: str):
        base = load_hf_nf4(self.base, self.double_quant)
        return base if name == BASE else PeftModel.from_pretrained(base, self.dirs[name]).eval()

    @cache
    def reference(self, name: str, prompt: tuple[int, ...]):
        if name in PROMPT_KINDS:        # not `generate`: see greedy_full_forward
            return greedy_full_forward(self.model(name), list(prompt), MAX_NEW)
        if name == BASE:
            return hf_reference(self.model(name), list(prompt))
        return peft_reference_plain(self.model(name), list(prompt))

    def engine(self, **kw) -> LLMEngine:
        engine = LLMEngine(EngineConfig(model=str(self.base), dtype="float32", quantize="nf4",
                                        double_quant=self.double_quant, kv_cache_memory="8MiB", block_size=4, **kw))
        for name, path in self.dirs.items():
            engine.adapters.load(name, str(path))
        return engine


@pytest.fixture(scope="module", params=[("llama-nf4", False), ("qwen2-nf4", True)],
                ids=["llama-plain", "qwen2-double"])
def setup(request, tiny_model_dir, tmp_path_factory):
    kind, double_quant = request.param
    return Setup(tiny_model_dir(kind), tmp_path_factory.mktemp(f"nf4-adapters-{kind}"), double_quant)


def test_mixed_batch_of_adapters_on_nf4_matches_peft_and_solo(setup):
    engine = setup.engine(max_num_batched_tokens=16)
    tokens, logits = run_with_adapters(engine, PROMPTS, NAMES, ARRIVALS)
    for i, (name, prompt) in enumerate(zip(NAMES, PROMPTS)):
        ref_tokens, ref_logits = setup.reference(name, tuple(prompt))
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)
        solo_tokens, solo_logits = run_with_adapters(engine, [prompt], [name], [0])
        assert solo_tokens[0] == tokens[i], (i, name)
        torch.testing.assert_close(solo_logits[0], logits[i], atol=ATOL, rtol=0)


def test_each_adapter_changes_the_nf4_output(setup):
    """Otherwise the comparisons above would prove little."""
    engine = setup.engine()
    for name in CONFIGS:
        prompt = PROMPTS[NAMES.index(name)] if name in NAMES else PROMPTS[0]
        with_adapter, _ = run_with_adapters(engine, [prompt], [name], [0])
        base, _ = run_with_adapters(engine, [prompt], [BASE], [0])
        assert with_adapter != base, name
