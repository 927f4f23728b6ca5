"""BitFit vs transformers with the fine-tuned biases set on the model (Qwen2 has q/k/v biases, Llama none):
greedy tokens identical, logits within 1e-4 (fp32), solo and in staggered mixed batches with LoRA, (IA)^3,
prefix tuning and base requests; AdapterDrop; the extraction tool; bad checkpoints are clear errors (400s over
HTTP)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig
from safetensors.torch import load_file, save_file

from adapters.bitfit import tensor_name
from adapters.config import AdapterError
from adapters.tools.extract_bitfit import main as extract_main
from server.config import EngineConfig
from server.engine import LLMEngine
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.test_ia3_vs_peft import save_ia3
from tests.test_lora_vs_peft import BASE, run_with_adapters
from tests.test_model_vs_hf import ATOL, MAX_NEW, hf_reference, make_prompts
from tests.tiny_models import load_hf

# the modules each fine-tune retrains: some with a base bias (Qwen2's q/k/v), most without (all of Llama's)
RETRAINED = {
    "attn": [(0, "q_proj"), (0, "k_proj"), (1, "v_proj"), (2, "o_proj"), (2, "q_proj")],
    "mlp_head": [(0, "down_proj"), (1, "gate_proj"), (1, "up_proj"), (2, "down_proj"), (None, "lm_head")],
}
OTHERS = {
    "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
}


def hf_module(model, layer, name):
    if name == "lm_head":
        return model.lm_head
    layer_module = model.model.layers[layer]
    return getattr(layer_module.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer_module.mlp,
                   name)


def bitfit_finetune(base: Path, modules, seed: int, below: int = 0):
    """The base model with new random biases on `modules` (a "BitFit fine-tune"); with `below` = k, modules in
    layers < k keep their base bias (the AdapterDrop reference)."""
    model = load_hf(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, name in modules:
            linear = hf_module(model, layer, name)
            bias = torch.randn(linear.out_features, generator=g) * 0.3
            if layer is not None and layer < below:
                continue
            linear.bias = torch.nn.Parameter(bias)
    return model


class Setup:
    def __init__(self, kind: str, base: Path, root: Path):
        self.kind, self.base, self.root = kind, base, root
        self.tuned = {name: bitfit_finetune(base, modules, seed=20 + i) for i, (name, modules) in
                      enumerate(RETRAINED.items())}
        self.dirs = {}
        for name, model in self.tuned.items():
            model.save_pretrained(root / f"{name}-model")
            assert extract_main([str(base), str(root / f"{name}-model"), str(root / name)]) == 0
            self.dirs[name] = root / name
        self.dirs["ia3"] = save_ia3(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"]), root / "ia3", seed=5)
        self.dirs.update({name: save_adapter(base, cfg, root / name, seed=i) for i, (name, cfg) in
                          enumerate(OTHERS.items())})
        self._refs = {}

    def reference(self, name: str, prompt: list[int]):
        key = (name, tuple(prompt))
        if key not in self._refs:
            if name in self.tuned:
                self._refs[key] = hf_reference(self.tuned[name], prompt)
            elif name == BASE:
                self._refs[key] = hf_reference(load_hf(self.base), prompt)
            elif name == "prefix":
                self._refs[key] = greedy_full_forward(load_peft(self.base, {name: self.dirs[name]}), prompt, MAX_NEW)
            else:
                self._refs[key] = hf_reference(load_peft(self.base, {name: self.dirs[name]}), prompt)
        return self._refs[key]

    def engine(self, **kw) -> LLMEngine:
        engine = LLMEngine(EngineConfig(model=str(self.base), dtype="float32", kv_cache_memory="8MiB", block_size=4,
                                        **kw))
        for name, path in self.dirs.items():
            engine.adapters.load(name, str(path))
        return engine


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_dir, tmp_path_factory):
    return Setup(request.param, tiny_model_dir(request.param), tmp_path_factory.mktemp(f"bitfit-{request.param}"))


def assert_matches(setup, name, prompt, tokens, logits):
    ref_tokens, ref_logits = setup.reference(name, prompt)
    assert tokens == ref_tokens, name
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_extracted_adapter_holds_the_retrained_biases(setup):
    for name, modules in RETRAINED.items():
        config = json.loads((setup.dirs[name] / "adapter_config.json").read_text())
        tensors = load_file(setup.dirs[name] / "adapter_model.safetensors")
        assert config["peft_type"] == "BITFIT"
        assert sorted(tensors) == sorted(tensor_name(layer, module) for layer, module in modules)
        for layer, module in modules:
            assert torch.equal(tensors[tensor_name(layer, module)], hf_module(setup.tuned[name], layer, module).bias)
    if setup.kind == "qwen2":      # base q/k/v biases the fine-tune left alone are not in the adapter
        assert tensor_name(1, "q_proj") not in load_file(setup.dirs["attn"] / "adapter_model.safetensors")


def test_each_bitfit_adapter_alone_matches_transformers_and_changes_the_output(setup):
    engine = setup.engine()
    for name, prompt in zip(RETRAINED, make_prompts(41, [9, 14])):
        tokens, logits = run_with_adapters(engine, [prompt], [name], [0])
        assert_matches(setup, name, prompt, tokens[0], logits[0])
        assert (logits[0][0] - setup.reference(BASE, prompt)[1][0]).abs().max() > 1e-2, name
    assert engine.adapters.get("attn").kind == "bitfit"


def test_mixed_batch_with_lora_ia3_prefix_and_base_matches_and_solo(setup):
    names = ["attn", BASE, "lora", "mlp_head", "prefix", "ia3", "attn", "mlp_head", BASE, "ia3"]
    prompts = make_prompts(42, [5, 12, 9, 17, 3, 14, 21, 1, 10, 6])
    arrivals = [0, 0, 0, 1, 2, 2, 4, 5, 6, 6]
    engine = setup.engine(max_num_batched_tokens=16)
    tokens, logits = run_with_adapters(engine, prompts, names, arrivals)
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        assert_matches(setup, name, prompt, tokens[i], logits[i])
        solo_tokens, solo_logits = run_with_adapters(engine, [prompt], [name], [0])
        assert solo_tokens[0] == tokens[i], (i, name)
        torch.testing.assert_close(solo_logits[0], logits[i], atol=ATOL, rtol=0)


def test_adapter_drop_keeps_base_biases_below_layer(setup):
    """adapter_drop=1: the adapter's biases act in layers >= 1 only (and on the lm_head, above every layer).
    Reference: the same fine-tune with layer 0's biases left at the base's."""
    prompt = make_prompts(43, [12])[0]
    for name in RETRAINED:
        reference = bitfit_finetune(setup.base, RETRAINED[name], seed=20 + list(RETRAINED).index(name), below=1)
        ref_tokens, ref_logits = hf_reference(reference, prompt)
        engine = setup.engine()
        add = engine.add_request
        engine.add_request = lambda rid, p, params, adapter=None: add(rid, p, params, adapter, adapter_drop=1)
        tokens, logits = run_with_adapters(engine, [prompt], [name], [0])
        assert tokens[0] == ref_tokens, name
        torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)
        assert (logits[0] - setup.reference(name, prompt)[1]).abs().max() > 1e-3, name


def write_bitfit(out: Path, tensors: dict, config: dict | None = None) -> str:
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "BITFIT", **(config or {})}))
    save_file(tensors, out / "adapter_model.safetensors")
    return str(out)


def test_hand_written_adapter_and_target_modules(setup, tmp_path):
    """The format without the tool: a bias on one module; target_modules, when given, must cover it."""
    bias = torch.randn(32, generator=torch.Generator().manual_seed(3))       # v_proj: 2 KV heads x 16
    ok = write_bitfit(tmp_path / "ok", {tensor_name(1, "v_proj"): bias}, {"target_modules": ["v_proj"]})
    engine = setup.engine()
    engine.adapters.load("one", ok)
    model = load_hf(setup.base)
    with torch.no_grad():
        hf_module(model, 1, "v_proj").bias = torch.nn.Parameter(bias.clone())
    prompt = make_prompts(44, [8])[0]
    tokens, logits = run_with_adapters(engine, [prompt], ["one"], [0])
    ref_tokens, ref_logits = hf_reference(model, prompt)
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)


def bad_cases(tmp_path: Path, vocab: int, hidden: int, num_layers: int):
    ok = torch.zeros(hidden)
    return [
        (write_bitfit(tmp_path / "shape", {tensor_name(0, "o_proj"): torch.zeros(hidden + 1)}),
         rf"o_proj\.bias has shape \[{hidden + 1}\], expected \[{hidden}\]"),
        (write_bitfit(tmp_path / "module", {"base_model.model.model.layers.0.mlp.fc1.bias": ok}),
         r"no linear module 'model\.layers\.0\.mlp\.fc1'"),
        (write_bitfit(tmp_path / "block", {"base_model.model.model.layers.0.mlp.o_proj.bias": ok}),
         r"no linear module"),
        (write_bitfit(tmp_path / "layer", {tensor_name(num_layers, "o_proj"): ok}), rf"layer {num_layers}"),
        (write_bitfit(tmp_path / "weight", {"base_model.model.model.layers.0.self_attn.o_proj.weight": ok}),
         r"unexpected key"),
        (write_bitfit(tmp_path / "norm", {"base_model.model.model.norm.bias": ok}), r"no linear module|unexpected"),
        (write_bitfit(tmp_path / "target", {tensor_name(0, "o_proj"): ok}, {"target_modules": ["q_proj"]}),
         r"not in target_modules"),
        (write_bitfit(tmp_path / "empty", {}), r"no bias tensors"),
        (write_bitfit(tmp_path / "nan", {tensor_name(0, "o_proj"): torch.full((hidden,), float("nan"))}),
         r"NaN"),
    ]


def test_bad_checkpoints_are_clear_errors(setup, tmp_path):
    engine = setup.engine()
    for path, match in bad_cases(tmp_path, 512, 64, 3):
        with pytest.raises(AdapterError, match=match):
            engine.adapters.load("bad", path)
    assert "bad" not in engine.adapters


def test_extract_refuses_what_is_not_bitfit(setup, tmp_path, capsys):
    model = bitfit_finetune(setup.base, [(0, "q_proj")], seed=1)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path / "full")
    assert extract_main([str(setup.base), str(tmp_path / "full"), str(tmp_path / "out")]) == 2
    assert "model.layers.1.mlp.up_proj.weight differs from the base (not a bias)" in capsys.readouterr().err
    assert extract_main([str(setup.base), str(setup.base), str(tmp_path / "out")]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
