"""AdapterHub LoRA (LoRAConfig, composition_mode "add"), ungated and gated (use_gating, UniPELT's LoRA gate).

Ungated: the same A / B saved by PEFT and renamed to AdapterHub's keys must equal PEFT (tokens, logits 1e-4).
Gated: AdapterHub's LoRA.forward transcribed as forward hooks on the transformers model is the reference: the
prompt's forward (row 0) with the gate over the whole sequence, exactly as AdapterHub; whole generations with the
gate taken over the prompt (what we serve, adapters/gates.py). Solo and mixed with PEFT LoRA, a bottleneck and
base requests; prefix caching never reuses a gated request's blocks; a prompt too long for one step is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from adapters.config import ADAPTERHUB_LORA, ADAPTERHUB_LORA_GATED, AdapterError, detect_kind
from server.config import EngineConfig
from server.engine import LLMEngine
from server.errors import ParamError
from server.sampling import SamplingParams
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.test_adapterhub_vs_fixtures import Fixture, run
from tests.test_model_vs_hf import ATOL
from tests.tiny_models import load_hf

MODULES = ["q_proj", "v_proj", "down_proj"]
MAX_NEW = 6


def adapterhub_dir(peft_dir: Path, out: Path, alpha: float, r: int, gated: bool, seed: int = 0) -> Path:
    """PEFT's A / B under AdapterHub's keys and config (plus random gates when `gated`)."""
    out.mkdir(parents=True)
    tensors = {}
    g = torch.Generator().manual_seed(seed)
    for key, t in load_file(peft_dir / "adapter_model.safetensors").items():
        module, param = key.removeprefix("base_model.model.").rsplit(".", 2)[0], key.split(".")[-2]
        tensors[f"{module}.loras.ah.{param}"] = t
        if gated and param == "lora_A":
            tensors[f"{module}.loras.ah.gate.weight"] = 0.3 * torch.randn(1, t.shape[1], generator=g)
            tensors[f"{module}.loras.ah.gate.bias"] = 1.5 + 0.3 * torch.randn(1, generator=g)   # g near 0.8
    save_file(tensors, out / "adapter.safetensors")
    config = {"architecture": "lora", "composition_mode": "add", "r": r, "alpha": alpha, "attn_matrices": ["q", "v"],
              "selfattn_lora": True, "intermediate_lora": False, "output_lora": True, "use_gating": gated,
              "use_dora": False, "vera_b": None, "vera_d": None, "dropout": 0.0}
    (out / "adapter_config.json").write_text(json.dumps({"config": config, "name": "ah", "model_type": "llama",
                                                         "version": "adapters.1.3.0"}))
    return out


class AdapterHubGatedLora:
    """AdapterHub's gated LoRA.forward on a transformers model, as forward hooks: each module's output gets
    (x @ A.T @ B.T) * mean_t sigmoid(gate(x)), the mean over positions < `gate_len` (None: the whole input)."""

    def __init__(self, model, adapter_dir: Path):
        self.model, self.gate_len = model, None
        tensors = load_file(adapter_dir / "adapter.safetensors")
        for name, module in model.named_modules():
            a = tensors.get(f"{name}.loras.ah.lora_A")
            if a is not None:
                p = {k: tensors[f"{name}.loras.ah.{k}"] for k in ("lora_B", "gate.weight", "gate.bias")}
                module.register_forward_hook(self._hook(a, p))

    def _hook(self, a, p):
        def hook(module, args, out):
            x = args[0]
            gate = torch.sigmoid(x @ p["gate.weight"].T + p["gate.bias"])
            gate = gate[:, :self.gate_len].mean(dim=1).unsqueeze(-1)        # [B, 1, 1]
            return out + (x @ a.T @ p["lora_B"].T) * gate
        return hook

    def greedy(self, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
        """Full forwards (no cache) with the gate over the prompt: the semantics we serve."""
        self.gate_len = len(prompt)
        try:
            return greedy_full_forward(self.model, prompt, max_new)
        finally:
            self.gate_len = None

    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """AdapterHub's own forward of the prompt (gate over the whole sequence): its last position's logits."""
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ahlora")
    fixture = Fixture("llama", tokenizer_dir, tmp)
    r, alpha = 4, 2                     # alpha / r = 0.5: a wrong scaling shows
    peft_dir = save_adapter(fixture.base, LoraConfig(r=r, lora_alpha=alpha, target_modules=MODULES,
                                                     init_lora_weights=False), tmp / "peft", seed=11)
    peft_other = save_adapter(fixture.base, LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj"],
                                                       init_lora_weights=False), tmp / "peft_other", seed=12)
    dirs = {"ah_lora": adapterhub_dir(peft_dir, tmp / "ah_lora", alpha, r, gated=False),
            "ah_gated": adapterhub_dir(peft_dir, tmp / "ah_gated", alpha, r, gated=True, seed=5),
            "peft_other": peft_other, "seq_bn": fixture.dir / "seq_bn"}
    refs = {"ah_lora": [greedy_full_forward(load_peft(fixture.base, {"x": peft_dir}), p, MAX_NEW)
                        for p in fixture.prompts],
            "peft_other": [greedy_full_forward(load_peft(fixture.base, {"x": peft_other}), p, MAX_NEW)
                           for p in fixture.prompts],
            "seq_bn": [fixture.expected("seq_bn", i) for i in range(len(fixture.prompts))],
            None: [fixture.expected("base", i) for i in range(len(fixture.prompts))]}
    gated = AdapterHubGatedLora(load_hf(fixture.base).eval(), dirs["ah_gated"])
    refs["ah_gated"] = [gated.greedy(p, MAX_NEW) for p in fixture.prompts]
    prompt_rows = [gated.prompt_logits(p) for p in fixture.prompts]
    return fixture, dirs, refs, prompt_rows


def engine(fixture, dirs, **kw) -> LLMEngine:
    kw = {"kv_cache_memory": "8MiB", "block_size": 4, **kw}
    e = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", **kw))
    for name, path in dirs.items():
        e.adapters.load(name, str(path))
    return e


def test_kinds(setup):
    _, dirs, _, _ = setup
    assert detect_kind(str(dirs["ah_lora"])) == ADAPTERHUB_LORA
    assert detect_kind(str(dirs["ah_gated"])) == ADAPTERHUB_LORA_GATED


def test_solo_equals_references(setup):
    """Each adapter alone: ungated == PEFT on the same A / B; gated: the prompt's logits == AdapterHub's forward
    (gate over the whole prompt), the whole generation == the gate-at-prefill reference; both change the output."""
    fixture, dirs, refs, prompt_rows = setup
    e = engine(fixture, dirs)
    for name in ("ah_lora", "ah_gated"):
        for i, prompt in enumerate(fixture.prompts):
            tokens, logits = run(e, [(prompt, name, None, 0)], MAX_NEW)
            want_tokens, want_logits = refs[name][i]
            assert tokens[0] == want_tokens, (name, i)
            torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0, msg=f"{name} prompt {i}")
            if name == "ah_gated":
                torch.testing.assert_close(logits[0][0], prompt_rows[i], atol=ATOL, rtol=0)
            assert (logits[0][0] - refs[None][i][1][0]).abs().max() > 0.1, name     # not the base model
    # the gate matters: gated and ungated (same A / B) differ
    assert (refs["ah_gated"][0][1][0] - refs["ah_lora"][0][1][0]).abs().max() > 0.1


def test_mixed_batch_equals_solo(setup):
    """Gated and ungated AdapterHub LoRA, PEFT LoRA, a bottleneck and base requests staggered in one batch with
    a 16-token budget (other prompts chunked; a gated prompt waits for a step with room for all of it)."""
    fixture, dirs, refs, _ = setup
    e = engine(fixture, dirs, max_num_batched_tokens=16, max_num_seqs=64)
    requests, want = [], []
    for n, name in enumerate(["ah_gated", "ah_lora", "peft_other", "seq_bn", None, "ah_gated"]):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, name, None, (n + 2 * i) % 4))
            want.append(refs[name][i])
    tokens, logits = run(e, requests, MAX_NEW)
    for (prompt, name, _, _), got_t, got_l, (want_t, want_l) in zip(requests, tokens, logits, want):
        assert got_t == want_t, (name, prompt)
        torch.testing.assert_close(got_l, want_l, atol=ATOL, rtol=0, msg=str(name))


def test_prefix_cache_never_reuses_gated_blocks(setup):
    """Two gated requests sharing 8 leading tokens: no cache hit (their K/V depend on the whole prompt), each
    equals its own reference; the same pair under the ungated adapter does hit (the cache is on)."""
    fixture, dirs, _, _ = setup
    shared = [5, 17, 300, 41, 9, 250, 12, 199]
    prompts = [shared + [64, 88, 23], shared + [7, 260]]
    gated = AdapterHubGatedLora(load_hf(fixture.base).eval(), dirs["ah_gated"])
    e = engine(fixture, dirs, enable_prefix_caching=True)
    cache = e.scheduler.blocks.cache
    for p in prompts:
        tokens, logits = run(e, [(p, "ah_gated", None, 0)], MAX_NEW)
        want_tokens, want_logits = gated.greedy(p, MAX_NEW)
        assert tokens[0] == want_tokens
        torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0)
    assert cache.num_hit_tokens == 0 and not cache.entries
    for p in prompts:
        run(e, [(p, "ah_lora", None, 0)], MAX_NEW)
    assert cache.num_hit_tokens == 8


def test_gated_prompt_must_fit_one_step(setup):
    fixture, dirs, _, _ = setup
    e = engine(fixture, dirs, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    with pytest.raises(ParamError, match="max_num_batched_tokens is 8"):
        e.add_request("long", list(range(10, 19)), params, "ah_gated")
    e.add_request("ok", list(range(10, 19)), params, "ah_lora")      # ungated: chunked as usual


@pytest.mark.parametrize("edit, match", [({"use_dora": True}, "use_dora=True"), ({"r": 0}, "positive integer"),
                                         ({"r": 8}, r"lora_A \(4, 128\)")])
def test_refusals(setup, tmp_path, edit, match):
    _, dirs, _, _ = setup
    src = dirs["ah_lora"]
    d = tmp_path / "edited"
    d.mkdir()
    (d / "adapter.safetensors").symlink_to(src / "adapter.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["config"].update(edit)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    fixture = setup[0]
    e = engine(fixture, {})
    with pytest.raises(AdapterError, match=match):
        e.adapters.load("bad", str(d))
