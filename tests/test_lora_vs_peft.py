"""Multi-LoRA in one batch vs PEFT: greedy tokens identical, logits within 1e-4 (fp32), solo == mixed."""
from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams
from tests.peft_fixtures import load_peft, randomize_adapter, save_adapter
from tests.test_model_vs_hf import ATOL, MAX_NEW, make_prompts, run_staggered
from tests.tiny_models import load_hf

BASE = "__base__"

MIXED = {
    # plain LoRA on two attention projections
    "qv": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    # rsLoRA on every linear, another rank
    "all": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, init_lora_weights=False),
    # rank/alpha patterns and a layer subset
    "pattern": LoraConfig(r=16, lora_alpha=32, target_modules=["o_proj", "gate_proj", "down_proj", "k_proj"],
                          rank_pattern={"down_proj": 2, "layers.2.self_attn.k_proj": 6},
                          alpha_pattern={"gate_proj": 5}, layers_to_transform=[0, 2], init_lora_weights=False),
}


def engine_with(path, adapters: dict, **kw) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", kv_cache_memory="8MiB", block_size=4, **kw))
    for name, adapter_dir in adapters.items():
        engine.adapters.load(name, str(adapter_dir))
    return engine


def peft_reference(model, prompt, adapter: str):
    out = model.generate(input_ids=torch.tensor([prompt]), adapter_names=[adapter], max_new_tokens=MAX_NEW,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def run_with_adapters(engine, prompts, adapters, arrivals):
    """run_staggered, but request i names adapters[i] (BASE = none)."""
    add = engine.add_request
    names = iter(adapters)
    engine.add_request = lambda rid, prompt, params: add(rid, prompt, params, _none(next(names)))
    try:
        return run_staggered(engine, prompts, arrivals)
    finally:
        engine.add_request = add


def _none(name):
    return None if name == BASE else name


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def mixed_setup(request, tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    dirs = {name: save_adapter(base, cfg, root / name, seed=i) for i, (name, cfg) in enumerate(MIXED.items())}
    return base, dirs, load_peft(base, dirs)


def test_mixed_lora_batch_matches_peft(mixed_setup):
    base, dirs, peft_model = mixed_setup
    prompts = make_prompts(11, [5, 12, 9, 17, 3, 8, 21, 6])
    adapters = ["qv", BASE, "all", "pattern", "all", "qv", BASE, "pattern"]
    arrivals = [0, 0, 0, 1, 2, 2, 4, 5]
    engine = engine_with(base, dirs, max_num_batched_tokens=32)
    tokens, logits = run_with_adapters(engine, prompts, adapters, arrivals)
    for i, (prompt, name) in enumerate(zip(prompts, adapters)):
        ref_tokens, ref_logits = peft_reference(peft_model, prompt, name)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)
        solo, _ = run_with_adapters(engine, [prompt], [name], [0])
        assert solo[0] == tokens[i], (i, name)
    # adapters really change the output (otherwise the comparison above proves little)
    base_only, _ = run_with_adapters(engine, prompts[:1], [BASE], [0])
    assert base_only[0] != tokens[0]


def test_peft_mixed_batch_generate_agrees(mixed_setup):
    """PEFT's own mixed-batch generate (equal prompt lengths, no padding) gives our tokens too."""
    base, dirs, peft_model = mixed_setup
    prompts = make_prompts(12, [7, 7, 7, 7])
    adapters = ["qv", "all", BASE, "pattern"]
    ref = peft_model.generate(input_ids=torch.tensor(prompts), adapter_names=adapters, max_new_tokens=MAX_NEW,
                              do_sample=False)[:, 7:].tolist()
    tokens, _ = run_with_adapters(engine_with(base, dirs), prompts, adapters, [0, 0, 0, 0])
    assert tokens == ref


SINGLE = {
    "dora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                       use_dora=True, init_lora_weights=False),
    "embed_lm_head": LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj"],
                                init_lora_weights=False),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("adapter", list(SINGLE))
def test_single_adapter_kinds_match_peft(tiny_model_dir, tmp_path, kind, adapter):
    """DoRA (qwen2: with qkv bias) and embedding + lm_head LoRA, each alone in PEFT and mixed with base
    requests in ours."""
    base = tiny_model_dir(kind)
    path = save_adapter(base, SINGLE[adapter], tmp_path / adapter, seed=7)
    peft_model = load_peft(base, {adapter: path})
    engine = engine_with(base, {adapter: path})
    prompts = make_prompts(13, [6, 11, 4])
    names = [adapter, BASE, adapter]
    tokens, logits = run_with_adapters(engine, prompts, names, [0, 0, 1])
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        if name == BASE:
            with peft_model.disable_adapter():
                ref_tokens, ref_logits = peft_reference_plain(peft_model, prompt)
        else:
            ref_tokens, ref_logits = peft_reference_plain(peft_model, prompt)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)


def peft_reference_plain(model, prompt):
    """PEFT generate with the active adapter (PEFT refuses adapter_names with DoRA)."""
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def test_adalora_after_rank_pruning_matches_peft(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    config = AdaLoraConfig(init_r=8, target_r=3, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "up_proj"])
    from peft import get_peft_model
    model = get_peft_model(load_hf(base), config)
    randomize_adapter(model, seed=3)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        ids = torch.randint(3, 500, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "ada")
    ranks = [sum(mask) for mask in model.peft_config["default"].rank_pattern.values()]   # kept-rank masks
    assert min(ranks) < 8, "ranks should have been pruned"
    peft_model = load_peft(base, {"ada": tmp_path / "ada"})
    engine = engine_with(base, {"ada": tmp_path / "ada"})
    prompts = make_prompts(14, [9, 5])
    tokens, logits = run_with_adapters(engine, prompts, ["ada", BASE], [0, 0])
    ref_tokens, ref_logits = peft_reference_plain(peft_model, prompts[0])
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("drop", [1, 2])
def test_adapter_drop_equals_peft_layers_to_transform(tiny_model_dir, tmp_path, drop):
    """adapter_drop=k equals PEFT with the adapter's layers_to_transform restricted to layers >= k."""
    base = tiny_model_dir("llama")
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=linears, init_lora_weights=False)
    full = save_adapter(base, cfg, tmp_path / "full", seed=5)
    n_layers = 3
    restricted_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=linears, init_lora_weights=False,
                                layers_to_transform=list(range(drop, n_layers)))
    restricted = save_restricted(base, full, restricted_cfg, tmp_path / "restricted")
    engine = engine_with(base, {"full": full})
    prompt = make_prompts(15, [10])[0]
    engine.add_request("d", prompt, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                       "full", adapter_drop=drop)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.token_ids)
    ref_tokens, _ = peft_reference_plain(load_peft(base, {"r": restricted}), prompt)
    full_tokens, _ = peft_reference_plain(load_peft(base, {"f": full}), prompt)
    assert tokens == ref_tokens
    assert tokens != full_tokens       # dropping layers changed something


def save_restricted(base, full_dir, cfg, out):
    """The same adapter weights, saved as an adapter that only targets layers in cfg.layers_to_transform."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    model = get_peft_model(load_hf(base), cfg)
    state = load_file(str(full_dir / "adapter_model.safetensors"))
    keep = {k: v for k, v in state.items()
            if not any(f"layers.{i}." in k for i in range(min(cfg.layers_to_transform)))}
    set_peft_model_state_dict(model, keep)
    model.save_pretrained(out)
    return out
