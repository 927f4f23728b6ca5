"""PEFT (IA)^3 vs PEFT, one adapter at a time (PEFT's own mixed batch ignores adapter_names for IA3): greedy
tokens identical, logits within 1e-4 (fp32), solo and in staggered mixed batches with LoRA, prefix tuning and
base requests; AdapterDrop; each adapter changes the output; bad checkpoints are clear errors."""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from adapters.config import AdapterError
from server.config import EngineConfig
from server.engine import LLMEngine
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.test_lora_vs_peft import BASE, run_with_adapters
from tests.test_model_vs_hf import ATOL, MAX_NEW, hf_reference, make_prompts
from tests.tiny_models import load_hf

IA3S = {
    # PEFT's default for Llama: k, v outputs and down_proj's input
    "kvd": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    # a feedforward module inside a fused linear (up of gate_up), gate's output, q's output, o's output
    "fused": IA3Config(target_modules=["q_proj", "o_proj", "gate_proj", "up_proj"], feedforward_modules=["up_proj"]),
    # the output head's logits scaled; o_proj's input
    "head": IA3Config(target_modules=["o_proj", "lm_head"], feedforward_modules=["o_proj"]),
    # a regex: only layers 0 and 2
    "regex": IA3Config(target_modules=r".*layers\.[02]\.(self_attn\.v_proj|mlp\.down_proj)",
                       feedforward_modules=r".*down_proj"),
}
OTHERS = {
    "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
}


def save_ia3(base: Path, config, out: Path, seed: int, layer_one: bool = False) -> Path:
    """PEFT initialises every ia3_l to 1 (a no-op): random vectors around 1 instead. `layer_one`: vectors of
    layer 1 and above left at 1 (the reference for AdapterDrop k=1 ... is built differently, see below)."""
    model = get_peft_model(load_hf(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


class Setup:
    def __init__(self, base: Path, root: Path):
        self.base = base
        self.dirs = {name: save_ia3(base, cfg, root / name, seed=10 + i) for i, (name, cfg) in enumerate(IA3S.items())}
        self.dirs.update({name: save_adapter(base, cfg, root / name, seed=i) for i, (name, cfg) in
                          enumerate(OTHERS.items())})
        self._models = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_hf(self.base) if name == BASE else load_peft(self.base, {name: self.dirs[name]})
        return self._models[name]

    @cache
    def reference(self, name: str, prompt: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
        if name == "prefix":        # not `generate`: see greedy_full_forward
            return greedy_full_forward(self.model(name), list(prompt), MAX_NEW)
        return hf_reference(self.model(name), list(prompt))

    def engine(self, **kw) -> LLMEngine:
        engine = LLMEngine(EngineConfig(model=str(self.base), dtype="float32", kv_cache_memory="8MiB", block_size=4,
                                        **kw))
        for name, path in self.dirs.items():
            engine.adapters.load(name, str(path))
        return engine


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_dir, tmp_path_factory):
    return Setup(tiny_model_dir(request.param), tmp_path_factory.mktemp(f"ia3-{request.param}"))


def assert_matches(setup: Setup, name: str, prompt: list[int], tokens: list[int], logits: torch.Tensor) -> None:
    ref_tokens, ref_logits = setup.reference(name, tuple(prompt))
    assert tokens == ref_tokens, name
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_each_ia3_adapter_alone_matches_peft_and_changes_the_output(setup):
    engine = setup.engine()
    prompts = make_prompts(31, [7, 13, 4, 10])
    for name, prompt in zip(IA3S, prompts):
        tokens, logits = run_with_adapters(engine, [prompt], [name], [0])
        assert_matches(setup, name, prompt, tokens[0], logits[0])
        base_tokens, base_logits = setup.reference(BASE, tuple(prompt))
        assert (logits[0][0] - base_logits[0]).abs().max() > 1e-2, name     # the first step already differs
    assert engine.adapters.get("kvd").kind == "ia3"


def test_mixed_batch_with_lora_prefix_and_base_matches_peft_and_solo(setup):
    """Every IA3 adapter, LoRA, prefix tuning and the base in one staggered batch; a 16-token budget chunks
    the prefills so they share steps with other requests' decodes."""
    names = ["kvd", BASE, "lora", "fused", "prefix", "head", "regex", "kvd", "lora", "fused"]
    prompts = make_prompts(32, [5, 12, 9, 17, 3, 14, 21, 1, 10, 6])
    arrivals = [0, 0, 0, 1, 2, 2, 4, 5, 6, 6]
    engine = setup.engine(max_num_batched_tokens=16)
    tokens, logits = run_with_adapters(engine, prompts, names, arrivals)
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        assert_matches(setup, name, prompt, tokens[i], logits[i])
        solo_tokens, solo_logits = run_with_adapters(engine, [prompt], [name], [0])
        assert solo_tokens[0] == tokens[i], (i, name)
        torch.testing.assert_close(solo_logits[0], logits[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("drop", [1, 2])
def test_adapter_drop_equals_peft_with_lower_layers_unscaled(setup, tmp_path, drop):
    """adapter_drop=k: no scaling in layers < k, for this request only. Reference: PEFT with the same adapter's
    vectors in layers < k set to 1 (the lm_head keeps its scale, as it sits above every layer)."""
    src = setup.dirs["head"] if drop == 2 else setup.dirs["kvd"]
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    (dropped / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    for key in tensors:
        if any(f".layers.{layer}." in key for layer in range(drop)):
            tensors[key] = torch.ones_like(tensors[key])
    save_file(tensors, dropped / "adapter_model.safetensors")
    ref = load_peft(setup.base, {"d": dropped})
    prompt = make_prompts(33, [11])[0]
    ref_tokens, ref_logits = hf_reference(ref, prompt)
    engine = setup.engine()
    name = "head" if drop == 2 else "kvd"
    add = engine.add_request
    engine.add_request = lambda rid, p, params, adapter=None: add(rid, p, params, adapter, adapter_drop=drop)
    tokens, logits = run_with_adapters(engine, [prompt, prompt], [name, BASE], [0, 0])
    engine.add_request = add
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)
    full_tokens, full_logits = run_with_adapters(engine, [prompt], [name], [0])
    assert (full_logits[0] - logits[0]).abs().max() > 1e-3       # dropping really changed something
    assert tokens[1] == setup.reference(BASE, tuple(prompt))[0]


def test_bad_ia3_checkpoints_are_clear_errors(setup, tmp_path):
    engine = setup.engine()
    src = setup.dirs["kvd"]

    def variant(name, tensors=None, config=None):
        out = tmp_path / name
        out.mkdir()
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg.update(config or {})
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors if tensors is not None else load_file(src / "adapter_model.safetensors"),
                  out / "adapter_model.safetensors")
        return str(out)

    good = load_file(src / "adapter_model.safetensors")
    down = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    k = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    cases = [
        (variant("shape", {**good, down: torch.ones(1, 7)}), r"down_proj\.ia3_l has shape \[1, 7\], expected \[1, 160\]"),
        (variant("notff", config={"feedforward_modules": []}), r"down_proj\.ia3_l has shape \[1, 160\], expected \[64, 1\]"),
        (variant("name", {**good, "base_model.model.model.layers.0.mlp.fc9.ia3_l": torch.ones(64, 1)}),
         r"fc9.*does not have"),
        (variant("layer", {**good, k.replace("layers.0", "layers.7"): torch.ones(32, 1)}), r"layer 7"),
        (variant("other", {**good, "base_model.model.model.layers.0.mlp.down_proj.bias": torch.ones(64)}),
         r"unexpected key"),
        (variant("untargeted", config={"target_modules": ["k_proj", "down_proj"]}), r"does not target .*v_proj"),
        (variant("fanin", config={"fan_in_fan_out": True}), r"fan_in_fan_out"),
        (variant("empty", {}), r"no \(IA\)\^3 vectors"),
    ]
    for path, match in cases:
        with pytest.raises(AdapterError, match=match):
            engine.adapters.load("bad", path)
    assert "bad" not in engine.adapters
    tokens, _ = run_with_adapters(engine, [[5, 6, 7]], ["kvd"], [0])
    assert tokens[0] == setup.reference("kvd", (5, 6, 7))[0]
