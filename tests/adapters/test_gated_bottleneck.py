"""AdapterHub SeqBn with use_gating (UniPELT's bottleneck; kind bottleneck_gated) vs AdapterHub's Adapter.forward
transcribed as hooks on the transformers model: the prompt's forward (gate over the whole sequence) exactly, whole
generations with the gate taken over the prompt (what we serve); solo and mixed with the ungated SeqBn, gated
AdapterHub LoRA, PEFT LoRA and base requests; a recompute after preemption keeps the prompt's gates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from adapters.config import BOTTLENECK_GATED, detect_kind
from server.config import EngineConfig
from server.engine import LLMEngine
from tests.adapters.test_adapterhub_lora import AdapterHubGatedLora, adapterhub_dir
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.test_adapterhub_vs_fixtures import Fixture, run
from tests.test_model_vs_hf import ATOL
from tests.tiny_models import load_hf

MAX_NEW = 6


def gated_seq_bn(src: Path, out: Path, seed: int) -> Path:
    """The seq_bn fixture with a random gate per module and use_gating set."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "adapter.safetensors")
    for key in [k for k in tensors if k.endswith("adapter_up.bias")]:
        stem = key.removesuffix("adapter_up.bias")
        tensors[stem + "gate.weight"] = 0.3 * torch.randn(1, tensors[key].shape[0], generator=g)
        tensors[stem + "gate.bias"] = 0.3 * torch.randn(1, generator=g)
    save_file(tensors, out / "adapter.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["config"]["use_gating"] = True
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


class AdapterHubGatedSeqBn:
    """AdapterHub's SeqBn output adapter with gating on a transformers Llama: after each MLP,
    h = r + o + g * up(relu(down(o + r))),  g = mean over positions < gate_len of sigmoid(gate(o + r))."""

    def __init__(self, model, adapter_dir: Path):
        self.model, self.gate_len = model, None
        t = load_file(adapter_dir / "adapter.safetensors")
        for i, layer in enumerate(model.model.layers):
            p = {k.split(f"layers.{i}.output_adapters.adapters.")[1].split(".", 1)[1]: v
                 for k, v in t.items() if f"layers.{i}.output_adapters." in k}
            layer.post_attention_layernorm.register_forward_pre_hook(self._keep_residual(layer))
            layer.mlp.register_forward_hook(self._adapter(layer, p))

    @staticmethod
    def _keep_residual(layer):
        def hook(module, args):
            layer._residual = args[0]
        return hook

    def _adapter(self, layer, p):
        def hook(module, args, o):
            x = o + layer._residual
            f = torch.relu(x @ p["adapter_down.0.weight"].T + p["adapter_down.0.bias"]) @ p["adapter_up.weight"].T \
                + p["adapter_up.bias"]
            g = torch.sigmoid(x @ p["gate.weight"].T + p["gate.bias"])[:, :self.gate_len].mean(dim=1).unsqueeze(-1)
            return o + f * g
        return hook

    def greedy(self, prompt, max_new):
        self.gate_len = len(prompt)
        try:
            return greedy_full_forward(self.model, prompt, max_new)
        finally:
            self.gate_len = None

    def prompt_logits(self, prompt):
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gatedbn")
    fixture = Fixture("llama", tokenizer_dir, tmp)
    peft_lora = save_adapter(fixture.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False), tmp / "peft", seed=21)
    dirs = {"bn_gated": gated_seq_bn(fixture.dir / "seq_bn", tmp / "bn_gated", 3), "seq_bn": fixture.dir / "seq_bn",
            "lora_gated": adapterhub_dir(peft_lora, tmp / "lora_gated", 8, 4, gated=True, seed=9),
            "peft_lora": peft_lora}
    bn = AdapterHubGatedSeqBn(load_hf(fixture.base).eval(), dirs["bn_gated"])
    lora = AdapterHubGatedLora(load_hf(fixture.base).eval(), dirs["lora_gated"])
    peft = load_peft(fixture.base, {"x": peft_lora})
    refs = {"bn_gated": [bn.greedy(p, MAX_NEW) for p in fixture.prompts],
            "lora_gated": [lora.greedy(p, MAX_NEW) for p in fixture.prompts],
            "peft_lora": [greedy_full_forward(peft, p, MAX_NEW) for p in fixture.prompts],
            "seq_bn": [fixture.expected("seq_bn", i) for i in range(3)],
            None: [fixture.expected("base", i) for i in range(3)]}
    return fixture, dirs, refs, [bn.prompt_logits(p) for p in fixture.prompts]


def engine(fixture, dirs, **kw):
    e = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", **{"kv_cache_memory": "8MiB",
                                                                            "block_size": 4, **kw}))
    for name, path in dirs.items():
        e.adapters.load(name, str(path))
    return e


def test_solo(setup):
    fixture, dirs, refs, prompt_rows = setup
    assert detect_kind(str(dirs["bn_gated"])) == BOTTLENECK_GATED
    e = engine(fixture, dirs)
    for i, prompt in enumerate(fixture.prompts):
        tokens, logits = run(e, [(prompt, "bn_gated", None, 0)], MAX_NEW)
        assert tokens[0] == refs["bn_gated"][i][0]
        torch.testing.assert_close(logits[0], refs["bn_gated"][i][1], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[0][0], prompt_rows[i], atol=ATOL, rtol=0)       # AdapterHub's forward
        for other in (None, "seq_bn"):            # the gate acts: neither the base nor the ungated adapter
            assert (logits[0][0] - refs[other][i][1][0]).abs().max() > 0.1


def test_mixed_and_preempted(setup):
    """Every adapter and base, staggered, 16-token budget, and a KV cache small enough to preempt: each equals
    its reference (a gated request recomputed after preemption reuses its prompt's gates)."""
    fixture, dirs, refs, _ = setup
    e = engine(fixture, dirs, max_num_batched_tokens=16, max_num_seqs=64, kv_cache_memory="48KiB")
    requests, want = [], []
    for n, name in enumerate(["bn_gated", "seq_bn", "lora_gated", "peft_lora", None, "bn_gated", "lora_gated"]):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, name, None, (n + 2 * i) % 5))
            want.append(refs[name][i])
    tokens, logits = run(e, requests, MAX_NEW)
    assert e.num_preemptions > 0
    for (prompt, name, _, _), got_t, got_l, (want_t, want_l) in zip(requests, tokens, logits, want):
        assert got_t == want_t, (name, prompt)
        torch.testing.assert_close(got_l, want_l, atol=ATOL, rtol=0, msg=str(name))
