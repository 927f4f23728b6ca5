"""Adapters of every kind served, on different target modules, made by PEFT on the tiny demo model; and the
solo reference: each request run alone on an engine holding every adapter."""
from __future__ import annotations

from functools import cache
from pathlib import Path

from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

from server.sampling import SamplingParams
from tests.http.conftest import make_engine
from tests.peft_fixtures import save_adapter

ZOO = {
    "lora-qv": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora-mlp": LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                           init_lora_weights=False),
    "dora-ko": LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj"], use_dora=True,
                          init_lora_weights=False),
    "lora-embed": LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "down_proj"],
                             init_lora_weights=False),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def save_zoo(demo_dir: str, root: Path, names=None) -> dict[str, Path]:
    return {name: save_adapter(Path(demo_dir), ZOO[name], root / name, seed=70 + i)
            for i, name in enumerate(ZOO) if names is None or name in names}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class SoloReference:
    """Greedy tokens of one request run alone on an engine with every adapter of `dirs` resident."""

    def __init__(self, demo_dir: str, dirs: dict[str, Path], **config):
        self.engine = make_engine(demo_dir, max_loras=len(dirs) + 1, **config)
        for name, path in dirs.items():
            self.engine.adapters.load(name, str(path))
        self.tokens = cache(self._tokens)

    def _tokens(self, adapter: str | None, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
        return tuple(self.engine.generate([list(prompt)], greedy(max_tokens), [adapter])[0])

    def text(self, adapter: str | None, prompt: tuple[int, ...], max_tokens: int) -> str:
        return self.engine.tokenizer.decode(list(self.tokens(adapter, prompt, max_tokens)), skip_special_tokens=True)
