"""`peftserve merge` / adapters/merge.py: a merged directory loads in transformers and in our engine, and both equal
the unmerged adapter under PEFT (greedy tokens identical, logits within 1e-4, fp32); `serve --merge NAME`."""
from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file

from adapters.merge import MergeError, merge_adapter
from server import cli
from tests.peft_fixtures import load_peft, save_adapter
from tests.test_lora_vs_peft import peft_reference_plain
from tests.test_model_vs_hf import ATOL, engine_for, hf_reference, make_prompts, run_staggered
from tests.tiny_models import load_hf

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "lora": ("llama", LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS + ["lm_head"], use_rslora=True,
                                 init_lora_weights=False)),
    "dora": ("qwen2", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                 init_lora_weights=False)),
    "adalora": ("llama", AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=12,
                                       target_modules=["q_proj", "up_proj"])),
    # tied embeddings: a LoRA on embed_tokens and on lm_head unties them
    "tied_embed_head": ("llama3", LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "o_proj"],
                                             init_lora_weights=False)),
    "tied_dora_embed": ("llama3", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "gate_proj"],
                                             use_dora=True, init_lora_weights=False)),
    # (IA)^3 on qwen2: k / v scale their outputs and qkv biases, down_proj (feedforward) its input
    "ia3": ("qwen2", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3_tied_head": ("llama3", IA3Config(target_modules=["q_proj", "lm_head", "up_proj"],
                                          feedforward_modules=["up_proj"])),
}
PROMPTS = make_prompts(41, [7, 12])


def make_adapter(base, config, out, seed):
    """save_adapter, but (IA)^3 vectors (initialised to 1) also get random values."""
    if not isinstance(config, IA3Config):
        return save_adapter(base, config, out, seed)
    model = get_peft_model(load_hf(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def assert_equals_reference(tokens, logits, ref):
    for i, (ref_tokens, ref_logits) in enumerate(ref):
        assert tokens[i] == ref_tokens, i
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)


def check_merged_dir(out, base, ref):
    """transformers and our engine on `out` both give `ref` [(tokens, logits)] for PROMPTS."""
    hf = load_hf(out)
    got = [hf_reference(hf, p) for p in PROMPTS]
    assert_equals_reference([g[0] for g in got], [g[1] for g in got], ref)
    tokens, logits = run_staggered(engine_for(out), PROMPTS, [0, 1])
    assert_equals_reference(tokens, logits, ref)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(base / name, out / name, shallow=False)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_checkpoint_equals_unmerged_adapter(tiny_model_dir, tmp_path, case):
    kind, config = CASES[case]
    base = tiny_model_dir(kind)
    adapter = make_adapter(base, config, tmp_path / "adapter", seed=5)
    peft_model = load_peft(base, {"a": adapter})
    ref = [peft_reference_plain(peft_model, p) for p in PROMPTS]
    base_tokens = [hf_reference(load_hf(base), p)[0] for p in PROMPTS]
    assert [r[0] for r in ref] != base_tokens                # the adapter changes the output
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    check_merged_dir(out, base, ref)
    merged = load_file(out / "model.safetensors")
    if "tied" in case:
        # untied: the input embedding changed; the head is the original embedding plus only its own LoRA (if any)
        original = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
        if "embed_tokens" in config.target_modules:
            assert not torch.equal(merged["model.embed_tokens.weight"], original)
        assert torch.equal(merged["lm_head.weight"], original) == ("lm_head" not in config.target_modules)
    else:
        # the weights are PEFT's merge_and_unload's
        want = peft_model.merge_and_unload().state_dict()
        assert set(merged) == set(want) - ({"lm_head.weight"} if "lm_head.weight" not in merged else set())
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, want[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_merged_mixture_equals_peft_weighted_adapter(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    a = save_adapter(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False), tmp_path / "a", seed=1)
    b = save_adapter(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                      init_lora_weights=False), tmp_path / "b", seed=2)
    model = load_peft(base, {"a": a, "b": b})
    model.add_weighted_adapter(["a", "b"], [0.8, 0.6], "mix", combination_type="ties", density=0.5)
    model.set_adapter("mix")
    ref = [peft_reference_plain(model, p) for p in PROMPTS]
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(base), "--adapter", str(a), "--adapter", str(b), "--weights", "0.8",
                     "0.6", "--merge-strategy", "ties", "--density", "0.5", "--out", str(out)]) == 0
    check_merged_dir(out, base, ref)


def test_merge_errors(tiny_model_dir, tmp_path, capsys):
    from peft import PrefixTuningConfig
    base = tiny_model_dir("llama")
    prefix = save_adapter(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), tmp_path / "p",
                          seed=0)
    with pytest.raises(MergeError, match="prefix_tuning adapters into the base is not supported"):
        merge_adapter(str(base), str(prefix), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(MergeError, match="not an empty directory"):
        merge_adapter(str(base), str(prefix), str(tmp_path / "full"))
    assert cli.main(["merge", "--model", str(base), "--adapter", str(prefix), "--out", str(tmp_path / "o")]) == 1
    with pytest.raises(SystemExit) as exit_info:            # a bad mixture recipe is a usage error
        cli.main(["merge", "--model", str(base), "--adapter", str(prefix), "--adapter", str(prefix),
                  "--merge-strategy", "ties", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "--density is required" in capsys.readouterr().err


def test_serve_merge_serves_the_adapter_merged(tiny_model_dir, tmp_path, monkeypatch):
    base = tiny_model_dir("llama")
    adapter = save_adapter(base, CASES["lora"][1], tmp_path / "adapter", seed=9)
    ref = [peft_reference_plain(load_peft(base, {"a": adapter}), p) for p in PROMPTS]
    seen = {}

    def fake_run_server(app, **kwargs):             # instead of uvicorn: check the engine the app serves
        engine = app.state.mixtures.async_engine.engine
        seen["name"], seen["adapters"], seen["model"] = engine.model_name, engine.adapters.names(), engine.config.model
        seen["out"] = run_staggered(engine, PROMPTS, [0, 0])

    monkeypatch.setattr(cli, "run_server", fake_run_server)
    options = cli.parse_serve_options(["serve", "--model", str(base), "--adapter", f"sql={adapter}",
                                       "--merge", "sql", "--dtype", "float32", "--kv-cache-memory", "8MiB"], {})
    cli.serve(options)
    assert seen["name"] == "sql" and seen["adapters"] == []
    assert_equals_reference(*seen["out"], ref)
    assert not os.path.exists(seen["model"])          # the temporary merged checkpoint is gone after serving


@pytest.mark.parametrize("argv,message", [
    (["--merge", "sql"], "no --adapter sql=PATH"),
    (["--adapter", "sql=/x", "--adapter", "chat=/y", "--merge", "sql"], "drop --adapter chat"),
    (["--adapter", "sql=/x", "--pin", "sql", "--merge", "sql"], "--pin has no effect"),
])
def test_serve_merge_usage_errors(tiny_model_dir, capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.parse_serve_options(["serve", "--model", str(tiny_model_dir("llama")), *argv], {})
    assert message in capsys.readouterr().err


def test_sharded_base_keeps_its_shards(tiny_model_dir, tmp_path):
    import json
    import shutil
    source = tiny_model_dir("llama")
    base = tmp_path / "sharded"
    load_hf(source).save_pretrained(base, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, base / name)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    adapter = save_adapter(base, CASES["lora"][1], tmp_path / "adapter", seed=6)
    ref = [peft_reference_plain(load_peft(base, {"a": adapter}), p) for p in PROMPTS]
    out = tmp_path / "merged"
    merge_adapter(str(base), str(adapter), str(out))
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    check_merged_dir(out, base, ref)


ADAPTERHUB = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"


@pytest.mark.parametrize("model,case", [("llama", "ia3"), ("llama", "ia3_alpha2_qv_up"), ("qwen2", "ia3")])
def test_merged_adapterhub_ia3_equals_adapterhub(tmp_path, tokenizer_dir, model, case):
    """AdapterHub's own greedy tokens and logits (the fixtures) from the merged checkpoint, in transformers (full
    forwards, as the fixtures were made) and in our engine."""
    import json
    import shutil

    from tests.peft_fixtures import greedy_full_forward
    root = ADAPTERHUB / model
    expected = json.loads((root / "expected.json").read_text())
    want_tokens, want_logits = expected["cases"][case]["tokens"], load_file(root / "expected.safetensors")[case]
    out = tmp_path / "merged"
    merge_adapter(str(root / expected["base"]), str(root / case), str(out))
    hf = load_hf(out)
    for i, prompt in enumerate(expected["prompts"]):
        tokens, logits = greedy_full_forward(hf, prompt, expected["max_new_tokens"])
        assert tokens == want_tokens[i], i
        torch.testing.assert_close(logits, want_logits[i], atol=ATOL, rtol=0)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    engine = engine_for(out)
    from tests.test_model_vs_hf import capture_logits
    from server.sampling import SamplingParams
    seen = capture_logits(engine)
    params = SamplingParams(max_tokens=expected["max_new_tokens"], temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(expected["prompts"]):
        engine.add_request(f"r{i}", prompt, params)
    got = {f"r{i}": [] for i in range(len(expected["prompts"]))}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    for i in range(len(expected["prompts"])):
        assert got[f"r{i}"] == want_tokens[i], i
        torch.testing.assert_close(torch.stack(seen[f"r{i}"]), want_logits[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind,modules", [
    ("llama", [(0, "q_proj"), (1, "v_proj"), (2, "o_proj"), (1, "up_proj"), (2, "down_proj")]),   # no base biases
    ("qwen2", [(0, "q_proj"), (0, "k_proj"), (1, "v_proj")]),                                    # base q/k/v biases
])
def test_merged_bitfit_equals_the_finetuned_model(tiny_model_dir, tmp_path, kind, modules):
    from adapters.tools.extract_bitfit import main as extract_main
    from tests.test_bitfit import bitfit_finetune
    base = tiny_model_dir(kind)
    tuned = bitfit_finetune(base, modules, seed=4)
    tuned.save_pretrained(tmp_path / "tuned")
    assert extract_main([str(base), str(tmp_path / "tuned"), str(tmp_path / "bitfit")]) == 0
    ref = [hf_reference(tuned, p) for p in PROMPTS]
    assert [r[0] for r in ref] != [hf_reference(load_hf(base), p)[0] for p in PROMPTS]
    out = tmp_path / "merged"
    merge_adapter(str(base), str(tmp_path / "bitfit"), str(out))
    check_merged_dir(out, base, ref)


@pytest.mark.parametrize("kind,module", [("llama", (None, "lm_head")), ("qwen2", (1, "o_proj"))])
def test_bitfit_bias_no_config_can_hold_is_refused(tiny_model_dir, tmp_path, kind, module):
    from adapters.tools.extract_bitfit import main as extract_main
    from tests.test_bitfit import bitfit_finetune
    base = tiny_model_dir(kind)
    bitfit_finetune(base, [module], seed=4).save_pretrained(tmp_path / "tuned")
    assert extract_main([str(base), str(tmp_path / "tuned"), str(tmp_path / "bitfit")]) == 0
    with pytest.raises(MergeError, match=f"a bias on {module[1]} cannot be written"):
        merge_adapter(str(base), str(tmp_path / "bitfit"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
