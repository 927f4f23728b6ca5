"""AdapterHub bottleneck adapters (SeqBn / DoubleSeqBn / ParBn, every math option) and AdapterHub (IA)^3 vs
AdapterHub 1.3.0 itself: greedy tokens identical and logits within 1e-4 (fp32) against the committed fixtures
(tests/fixtures/adapterhub, made by make_fixtures.py), solo and all in one staggered, chunked batch with PEFT LoRA,
PEFT prefix tuning and base requests; AdapterDrop (per request and the adapter's default) vs `skip_layers`."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig
from safetensors.torch import load_file

from adapters.config import ADAPTERHUB_IA3, BOTTLENECK, AdapterError, detect_kind
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.test_model_vs_hf import ATOL, capture_logits

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adapterhub"
BASE = None


class Fixture:
    """One base model's fixtures: the manifest, the expected logits, and the servable cases."""

    def __init__(self, kind: str, tokenizer_dir: Path, tmp: Path):
        self.dir = FIXTURES / kind
        # the committed base weights, with the test tokenizer beside them (the engine loads one)
        self.base = tmp / f"{kind}-base"
        self.base.mkdir()
        for f in [*(self.dir / "base").iterdir(), *tokenizer_dir.iterdir()]:
            (self.base / f.name).symlink_to(f)
        self.manifest = json.loads((self.dir / "expected.json").read_text())
        self.logits = load_file(self.dir / "expected.safetensors")
        self.prompts = self.manifest["prompts"]
        self.max_new = self.manifest["max_new_tokens"]
        self.cases = {}          # case -> (adapter folder or None, adapter_drop)
        for name, case in self.manifest["cases"].items():
            if "adapterhub_error" in case or len(case["adapters"]) > 1:
                continue
            folder = case["adapters"][0] if case["adapters"] else None
            if folder is not None:
                config = json.loads((self.dir / folder / "adapter_config.json").read_text())["config"]
                if config.get("architecture") not in (None, "lora") or config.get("phm_layer"):
                    continue        # prefix, union: test_adapterhub_prefix_mam.py; Compacter: refused below
                assert detect_kind(str(self.dir / folder)) in (BOTTLENECK, ADAPTERHUB_IA3)
            skip = case["skip_layers"] or []
            assert skip == list(range(len(skip)))          # AdapterDrop k == skip_layers range(k)
            self.cases[name] = (folder, len(skip))

    def adapters(self) -> dict[str, Path]:
        return {folder: self.dir / folder for folder, _ in self.cases.values() if folder is not None}

    def expected(self, case: str, i: int) -> tuple[list[int], torch.Tensor]:
        return self.manifest["cases"][case]["tokens"][i], self.logits[case][i]


def engine_for(fixture: Fixture, extra: dict[str, Path] | None = None, **kw) -> LLMEngine:
    kw = {"kv_cache_memory": "8MiB", "block_size": 4, **kw}
    engine = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", **kw))
    for name, path in {**fixture.adapters(), **(extra or {})}.items():
        engine.adapters.load(name, str(path))
    return engine


def run(engine: LLMEngine, requests: list[tuple[list[int], str | None, int | None, int]], max_new: int):
    """requests: (prompt, adapter, adapter_drop, arrival step). Returns tokens and logits per request."""
    seen = capture_logits(engine)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    tokens = defaultdict(list)
    step = 0
    while step <= max(r[3] for r in requests) or engine.has_unfinished():
        for i, (prompt, adapter, drop, at) in enumerate(requests):
            if at == step:
                engine.add_request(f"r{i}", prompt, params, adapter, drop)
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        step += 1
    engine.runner.run = type(engine.runner).run.__get__(engine.runner)
    return [tokens[f"r{i}"] for i in range(len(requests))], [torch.stack(seen[f"r{i}"]) for i in range(len(requests))]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def fixture(request, tokenizer_dir, tmp_path_factory) -> Fixture:
    return Fixture(request.param, tokenizer_dir, tmp_path_factory.mktemp("adapterhub"))


def test_fixtures_cover_the_options(fixture):
    cases = fixture.cases
    assert len(cases) >= (30 if fixture.dir.name == "llama" else 7)
    assert any(drop for _, drop in cases.values())
    for name, (folder, _) in cases.items():
        if folder is not None:           # each adapter really changes the output (AdapterHub's own logits)
            assert fixture.manifest["cases"][name]["max_abs_diff_vs_base"] > 0.5, name


def test_each_adapter_alone_matches_adapterhub(fixture):
    """Each case as a request alone (one prompt per case, rotating; all prompts run in the mixed test)."""
    engine = engine_for(fixture)
    base_tokens = fixture.manifest["cases"]["base"]["tokens"]
    for n, (name, (folder, drop)) in enumerate(fixture.cases.items()):
        i = n % len(fixture.prompts)
        tokens, logits = run(engine, [(fixture.prompts[i], folder, drop, 0)], fixture.max_new)
        want_tokens, want_logits = fixture.expected(name, i)
        assert tokens[0] == want_tokens, (name, i)
        torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0, msg=f"{name} prompt {i}")
        if folder is not None:           # the adapter changes AdapterHub's output, and ours with it
            assert fixture.manifest["cases"][name]["tokens"] != base_tokens, name


def test_adapter_default_drop_equals_skip_layers(fixture):
    """AdapterDrop as the adapter's default (set at load) == AdapterHub's skip_layers; a request may override."""
    name = "seq_bn_skip1"
    folder, drop = fixture.cases[name]
    engine = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", kv_cache_memory="8MiB",
                                    block_size=4))
    engine.adapters.load("dropped", str(fixture.dir / folder), drop)
    tokens, logits = run(engine, [(p, "dropped", None, 0) for p in fixture.prompts], fixture.max_new)
    override, _ = run(engine, [(p, "dropped", 0, 0) for p in fixture.prompts], fixture.max_new)
    for i in range(len(fixture.prompts)):
        assert tokens[i] == fixture.expected(name, i)[0]
        torch.testing.assert_close(logits[i], fixture.expected(name, i)[1], atol=ATOL, rtol=0)
        assert override[i] == fixture.expected("seq_bn", i)[0]


@pytest.fixture(scope="module")
def peft_adapters(fixture, tmp_path_factory):
    """A PEFT LoRA and a PEFT prefix-tuning adapter on the same fixture base, and PEFT's references."""
    root = tmp_path_factory.mktemp(f"peft-{fixture.dir.name}")
    base = fixture.base
    dirs = {"peft_lora": save_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                       init_lora_weights=False), root / "lora", seed=3),
            "peft_prefix": save_adapter(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                                        root / "prefix", seed=4)}
    refs = {}
    for name, path in dirs.items():
        model = load_peft(base, {name: path})
        refs[name] = [greedy_full_forward(model, p, fixture.max_new) for p in fixture.prompts]
    return dirs, refs


def test_mixed_batch_with_lora_prefix_and_base(fixture, peft_adapters):
    """Every case's requests, PEFT LoRA / prefix requests and base requests in one staggered batch, prefills
    chunked by a 16-token budget: each equals its reference (AdapterHub's or PEFT's)."""
    dirs, refs = peft_adapters
    engine = engine_for(fixture, dirs, max_num_batched_tokens=16, max_num_seqs=64)
    requests, want = [], []
    for n, (name, (folder, drop)) in enumerate(fixture.cases.items()):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, folder, drop, (n + i) % 5))
            want.append(fixture.expected(name, i))
    for n, name in enumerate(dirs):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, name, None, (2 * n + i) % 4))
            want.append(refs[name][i])
    tokens, logits = run(engine, requests, fixture.max_new)
    for (prompt, adapter, drop, _), got_tokens, got_logits, (want_tokens, want_logits) in zip(
            requests, tokens, logits, want):
        assert got_tokens == want_tokens, (adapter, drop, prompt)
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0, msg=f"{adapter} drop {drop}")


@pytest.mark.parametrize("folder, option", [("seq_bn_post_add", "residual_before_ln='post_add'"),
                                            ("compacter", "phm_layer=True")])
def test_unservable_option_is_refused_at_load(folder, option, tokenizer_dir, tmp_path):
    """AdapterHub itself cannot run post_add on Llama (manifest: adapterhub_error); Compacter's PHM layers are
    not served: both a clear AdapterError naming the option, and the engine keeps serving."""
    llama = Fixture("llama", tokenizer_dir, tmp_path)
    engine = engine_for(llama)
    with pytest.raises(AdapterError, match=option.replace("(", r"\(")):
        engine.adapters.load("bad", str(llama.dir / folder))
    tokens, _ = run(engine, [(llama.prompts[0], "seq_bn", None, 0)], llama.max_new)
    assert tokens[0] == llama.expected("seq_bn", 0)[0]
