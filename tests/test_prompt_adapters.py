"""Prefix tuning, prompt tuning and P-tuning vs PEFT: greedy tokens identical, logits within 1e-4 (fp32), solo
and in staggered, chunked mixed batches with LoRA and base requests; AdapterDrop; preemption; KV accounting;
bad checkpoints."""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoConfig
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from adapters.config import AdapterError
from adapters.prompt import load_prompt_adapter
from server.kv_blocks import BlockManager, cdiv
from adapters.model_spec import ModelSpec
from server.sampling import ParamError, SamplingParams
from server.sequence import Sequence
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from server.config import EngineConfig
from server.engine import LLMEngine
from tests.test_lora_vs_peft import BASE, run_with_adapters
from tests.test_model_vs_hf import ATOL, MAX_NEW, hf_reference, make_prompts
from tests.tiny_models import load_hf

BLOCK_SIZE = 4      # divides none of the virtual-token counts below


def configs(base: Path) -> dict:
    return {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        "prefix_proj": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                          encoder_hidden_size=32),
        "prompt_random": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7),
        "prompt_text": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                          prompt_tuning_init_text="def main(", tokenizer_name_or_path=str(base)),
        "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=24),
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False),
    }


class Setup:
    """Adapters saved by PEFT on one tiny base, and PEFT's outputs for them (computed once per prompt)."""

    def __init__(self, base: Path, root: Path):
        self.base = base
        self.dirs = {name: save_adapter(base, cfg, root / name, seed=i) for i, (name, cfg) in
                     enumerate(configs(base).items())}
        self._models = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_hf(self.base) if name == BASE else load_peft(self.base, {name: self.dirs[name]})
        return self._models[name]

    @cache
    def reference(self, name: str, prompt: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
        if name in PROMPT_KINDS:        # not `generate`: see greedy_full_forward
            return greedy_full_forward(self.model(name), list(prompt), MAX_NEW)
        return hf_reference(self.model(name), list(prompt))

    def engine(self, **kw):
        return engine_with(self.base, self.dirs, **kw)


def engine_with(base: Path, adapters: dict, **kw) -> LLMEngine:
    kw = {"kv_cache_memory": "8MiB", "block_size": BLOCK_SIZE, **kw}
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", **kw))
    for name, path in adapters.items():
        engine.adapters.load(name, str(path))
    return engine


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_dir, tmp_path_factory):
    return Setup(tiny_model_dir(request.param), tmp_path_factory.mktemp(f"prompt-{request.param}"))


PROMPT_KINDS = ["prefix", "prefix_proj", "prompt_random", "prompt_text", "p_tuning"]
NAMES = ["prefix", BASE, "prompt_random", "lora", "prefix_proj", "p_tuning", "prompt_text", "prefix", "p_tuning"]
PROMPTS = make_prompts(21, [5, 12, 9, 17, 3, 14, 21, 1, 10])
ARRIVALS = [0, 0, 0, 1, 2, 2, 4, 5, 6]


def assert_matches(setup: Setup, name: str, prompt: list[int], tokens: list[int], logits: torch.Tensor) -> None:
    ref_tokens, ref_logits = setup.reference(name, tuple(prompt))
    assert tokens == ref_tokens, name
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_each_kind_alone_matches_peft(setup):
    engine = setup.engine()
    for name, prompt in zip(NAMES, PROMPTS):
        if name in PROMPT_KINDS:
            tokens, logits = run_with_adapters(engine, [prompt], [name], [0])
            assert_matches(setup, name, prompt, tokens[0], logits[0])
            # the adapter changes the output (else the comparison proves little)
            assert tokens[0] != setup.reference(BASE, tuple(prompt))[0], name
    assert engine.scheduler.blocks.num_used == sum(cdiv(n, BLOCK_SIZE) for n in (6, 5, 7, 5, 6))


def test_mixed_batch_of_every_kind_matches_peft_and_solo(setup):
    """All kinds, a LoRA adapter and the base in one staggered batch; a 16-token budget chunks the prefills
    so they share steps with other requests' decodes."""
    engine = setup.engine(max_num_batched_tokens=16)
    tokens, logits = run_with_adapters(engine, PROMPTS, NAMES, ARRIVALS)
    for i, (name, prompt) in enumerate(zip(NAMES, PROMPTS)):
        assert_matches(setup, name, prompt, tokens[i], logits[i])
        solo_tokens, solo_logits = run_with_adapters(engine, [prompt], [name], [0])
        assert solo_tokens[0] == tokens[i], (i, name)
        torch.testing.assert_close(solo_logits[0], logits[i], atol=ATOL, rtol=0)


def test_preemption_with_shared_prefixes(setup):
    """A KV cache too small for all requests: prefix requests are preempted and re-admitted (re-attaching
    their adapter's blocks); outputs equal their solo runs; afterwards only the adapters' blocks are used."""
    names = ["prefix", "prompt_random", "prefix", BASE, "p_tuning"]
    prompts = make_prompts(22, [18, 22, 25, 20, 16])
    big = setup.engine()
    solo = [run_with_adapters(big, [p], [n], [0])[0][0] for p, n in zip(prompts, names)]
    # 3 KiB per 4-token block; 40 blocks, of which the 6 adapters' prefixes hold 2 each
    small = setup.engine(kv_cache_memory=40 * 3072)
    prefix_blocks = small.scheduler.blocks.num_used
    preemptions = []
    schedule = small.scheduler.schedule
    small.scheduler.schedule = lambda: (lambda out: (preemptions.extend(out.preempted), out)[1])(schedule())
    tokens, _ = run_with_adapters(small, prompts, names, [0] * len(prompts))
    assert any(s.num_virtual_tokens for s in preemptions), "a prefix request should have been preempted"
    assert tokens == solo
    blocks = small.scheduler.blocks
    assert blocks.num_used == prefix_blocks
    for name in list(small.adapters.handles):
        small.adapters.unload(name)
    assert blocks.num_used == 0 and all(c == 0 for c in blocks.ref_counts)


def test_prefix_adapters_survive_eviction(setup):
    """With the runtime marked evictable: two device slots for three adapters and a tight KV cache, so prefix
    adapters are evicted (their blocks freed) and re-installed into other slots and blocks while their requests
    wait; outputs still equal PEFT."""
    names = ["prefix", "lora", "prompt_random", "prefix", "lora", "prompt_random", BASE]
    prompts = make_prompts(26, [9, 14, 6, 11, 4, 13, 8])
    engine = engine_with(setup.base, {}, max_loras=2, kv_cache_memory=24 * 3072, max_num_batched_tokens=16)
    next(rt for rt in engine.runtimes if rt.name == "prefix").evictable = True
    for name in ("prefix", "lora", "prompt_random"):
        engine.adapters.load(name, str(setup.dirs[name]))
    installs = []
    install = engine.prefixes.install
    engine.prefixes.install = lambda slot, weights: (installs.append(slot), install(slot, weights))[1]
    tokens, logits = run_with_adapters(engine, prompts, names, [0, 0, 1, 12, 13, 24, 25])
    assert len(installs) > 2, "prefix adapters should have been evicted and re-installed"
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        assert_matches(setup, name, prompt, tokens[i], logits[i])


# ---- AdapterDrop ---------------------------------------------------------------------------------------------
def hide_virtual_tokens(num_virtual: int, first_layer: int) -> str:
    """An HF attention implementation: in layers < first_layer, queries at positions >= num_virtual (the
    request's tokens) do not attend keys at positions < num_virtual (the virtual tokens); eager otherwise."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx < first_layer:
            q_len, k_len = query.shape[2], key.shape[2]
            qpos = torch.arange(k_len - q_len, k_len)[:, None]
            kpos = torch.arange(k_len)[None, :]
            hidden = (qpos >= num_virtual) & (kpos < num_virtual)
            mask = torch.zeros(1, 1, q_len, k_len) if attention_mask is None else attention_mask[..., :k_len]
            attention_mask = mask.masked_fill(hidden, torch.finfo(query.dtype).min)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    AttentionInterface.register("hide_virtual", attention)
    AttentionMaskInterface.register("hide_virtual", eager_mask)
    return "hide_virtual"


@pytest.mark.parametrize("name,drop", [("prefix", 1), ("prompt_random", 2)])
def test_adapter_drop_hides_virtual_tokens_below_layer(tiny_model_dir, tmp_path, name, drop):
    """adapter_drop=k: the request's tokens do not attend the virtual tokens in layers < k (prefix and prompt
    tuning alike: prompt tuning's virtual tokens still run through every layer, as input). Reference: PEFT with
    an attention that masks those keys in those layers."""
    base = tiny_model_dir("llama")
    setup = Setup(base, tmp_path)
    prompt = make_prompts(23, [11])[0]
    engine = setup.engine()
    engine.add_request("d", prompt, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True), name,
                       adapter_drop=drop)
    engine.add_request("full", prompt, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True), name)
    tokens = {"d": [], "full": []}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    assert tokens["full"] == setup.reference(name, tuple(prompt))[0]
    model = setup.model(name)
    num_virtual = model.peft_config[name].num_virtual_tokens
    model.base_model.set_attn_implementation(hide_virtual_tokens(num_virtual, drop))
    ref_tokens, _ = greedy_full_forward(model, prompt, MAX_NEW)
    assert tokens["d"] == ref_tokens != tokens["full"]


# ---- accounting ----------------------------------------------------------------------------------------------
def test_block_manager_shares_prefix_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    prefix = bm.allocate_prefix(6)                     # 2 blocks, right-aligned: pad 2
    assert prefix.pad == 2 and bm.num_free == 8
    bm.prefix_of = lambda seq: prefix
    seqs = [Sequence(f"s{i}", [1] * 5, SamplingParams(max_tokens=4), num_virtual_tokens=6) for i in range(2)]
    for s in seqs:
        assert bm.blocks_needed(s, 5) == 2             # own tokens only: 5 tokens in 2 fresh blocks
        bm.allocate(s, 5)
        assert s.block_table[:2] == list(prefix.blocks) and len(s.block_table) == 4
    assert bm.num_free == 4 and [bm.ref_counts[b] for b in prefix.blocks] == [3, 3]
    s = seqs[0]
    s.num_computed_tokens = 5
    assert bm.blocks_needed(s, 3) == 0 and bm.blocks_needed(s, 4) == 1
    bm.free(s)                                         # preempted: own blocks back, prefix kept
    assert s.block_table == [] and s.prefix is None and bm.num_free == 6
    s.num_computed_tokens = 0
    bm.allocate(s, 5)                                  # re-admitted: prefix re-attached
    assert s.block_table[:2] == list(prefix.blocks)
    bm.free_prefix(prefix)                             # adapter removed while sequences still use it
    assert bm.num_free == 4
    for s in seqs:
        bm.free(s)
    assert bm.num_free == 10


def test_virtual_tokens_count_against_max_model_len(setup):
    engine = setup.engine(max_model_len=40)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompt = make_prompts(24, [27])[0]
    engine.add_request("base", prompt, params)                           # 27 + 10 <= 40
    with pytest.raises(ParamError, match="virtual tokens 6"):
        engine.add_request("prefix", prompt, params, "prefix")           # 6 + 27 + 10 > 40
    assert engine.context_len("prefix") == 34 and engine.context_len(None) == 40
    engine.add_request("fits", prompt[:24], params, "prefix")
    while engine.has_unfinished():
        outputs = engine.step()
        done = [o for o in outputs if o.finished and o.request_id == "fits"]
        if done:
            assert done[0].num_prompt_tokens == 24 and done[0].num_output_tokens == 10


def test_prefix_blocks_need_kv_room_and_are_freed_on_unload(setup):
    # 3 KiB per block: 4 blocks hold prefix (2) + prompt_random (2), nothing for p_tuning (2 more)
    engine = engine_with(setup.base, {}, kv_cache_memory=4 * 3072)
    engine.adapters.load("prefix", str(setup.dirs["prefix"]))
    engine.adapters.load("prompt_random", str(setup.dirs["prompt_random"]))
    assert engine.stats()["kv_blocks_used"] == 4
    with pytest.raises(AdapterError, match="no room in the KV cache"):
        engine.adapters.load("p_tuning", str(setup.dirs["p_tuning"]))
    assert engine.stats()["kv_blocks_used"] == 4
    engine.adapters.unload("prefix")
    engine.adapters.load("p_tuning", str(setup.dirs["p_tuning"]))
    assert engine.stats()["kv_blocks_used"] == 4


# ---- bad checkpoints ------------------------------------------------------------------------------------------
def _edit(src: Path, dst: Path, config: dict | None = None, tensors=None, raw: bytes | None = None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = dst / "adapter_model.safetensors"
    if raw is not None:
        weights.write_bytes(raw)
    else:
        state = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: v.contiguous() for k, v in (tensors(state) if tensors else state).items()}, str(weights))
    return dst


def _nan(state):
    t = state["prompt_embeddings"].clone()
    t[0, 3] = float("nan")
    return {"prompt_embeddings": t}


@pytest.mark.parametrize("kind,edit,message", [
    ("prefix", dict(config={"num_layers": 2}), "num_layers=2, but the base model has 3"),
    ("prefix", dict(config={"num_attention_heads": 4, "token_dim": 64}), "PEFT < 0.12"),
    ("prefix", dict(config={"token_dim": 16}), "token_dim=16"),
    ("prefix", dict(tensors=lambda s: {"prompt_embeddings": s["prompt_embeddings"][:, :-1]}), r"shape \[6, 191\]"),
    ("prefix", dict(config={"num_virtual_tokens": 7}), r"expected \[7, 192\]"),
    ("prompt_random", dict(config={"token_dim": 32}), "hidden size is 64"),
    ("prompt_random", dict(tensors=lambda s: {"prompt_embeddings": s["prompt_embeddings"][:, :32]}),
     r"expected \[7, 64\]"),
    ("p_tuning", dict(tensors=_nan), "NaN"),
    ("p_tuning", dict(tensors=lambda s: {"embedding": s["prompt_embeddings"]}), "no 'prompt_embeddings'"),
    ("prompt_text", dict(tensors=lambda s: {**s, "extra": torch.zeros(2)}), "unexpected tensor"),
    ("prompt_text", dict(config={"num_transformer_submodules": 2}), "encoder-decoder"),
])
def test_bad_checkpoints_are_rejected(setup, tmp_path, kind, edit, message):
    spec = ModelSpec.from_hf(AutoConfig.from_pretrained(setup.base))
    path = _edit(setup.dirs[kind], tmp_path / "bad", **edit)
    with pytest.raises(AdapterError, match=message):
        load_prompt_adapter(str(path), spec)


def test_truncated_checkpoint_is_rejected_and_leaves_no_blocks(setup, tmp_path):
    src = setup.dirs["prefix"]
    raw = (src / "adapter_model.safetensors").read_bytes()
    path = _edit(src, tmp_path / "cut", raw=raw[: len(raw) // 2])
    engine = engine_with(setup.base, {})
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        engine.adapters.load("cut", str(path))
    assert engine.stats()["kv_blocks_used"] == 0 and "cut" not in engine.adapters


def test_prefix_lengths_around_block_boundaries(tiny_model_dir, tmp_path):
    """Virtual-token counts bs - 1, bs and bs + 1, and block size 1."""
    base = tiny_model_dir("llama")
    prompt = make_prompts(25, [7])[0]
    for block_size, n in [(1, 3), (3, 2), (3, 3), (8, 9)]:
        name = f"p{block_size}_{n}"
        path = save_adapter(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), tmp_path / name,
                            seed=block_size * 10 + n)
        engine = engine_with(base, {name: path}, block_size=block_size)
        tokens, logits = run_with_adapters(engine, [prompt], [name], [0])
        ref_tokens, ref_logits = greedy_full_forward(load_peft(base, {name: path}), prompt, MAX_NEW)
        assert tokens[0] == ref_tokens, name
        torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)
