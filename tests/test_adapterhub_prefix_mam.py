"""AdapterHub prefix tuning (MLP-reparameterised and flat) and MAM (ConfigUnion: prefix + parallel bottleneck)
vs AdapterHub 1.3.0 itself (tests/fixtures/adapterhub, cases `prefix`, `prefix_flat`, `mam`): greedy tokens
identical and logits within 1e-4 (fp32), solo and in one staggered, chunked batch with PEFT LoRA, PEFT prefix
tuning (whose own tokens start at position n, where AdapterHub's start at 0), an AdapterHub bottleneck adapter
and base requests; options we cannot serve are refused by name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapters.config import ADAPTERHUB_PREFIX, ADAPTERHUB_UNION, BOTTLENECK, AdapterError, detect_kind
from server.config import EngineConfig
from server.engine import LLMEngine
from tests.test_adapterhub_vs_fixtures import Fixture, peft_adapters, run  # noqa: F401 (fixture)
from tests.test_model_vs_hf import ATOL

CASES = ["prefix", "prefix_flat", "mam"]


@pytest.fixture(scope="module")
def fixture(tokenizer_dir, tmp_path_factory) -> Fixture:
    return Fixture("llama", tokenizer_dir, tmp_path_factory.mktemp("adapterhub-prefix"))


def engine_with(fixture: Fixture, extra: dict | None = None, **kw) -> LLMEngine:
    kw = {"kv_cache_memory": "8MiB", "block_size": 4, **kw}
    engine = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", **kw))
    for name in [*CASES, "par_bn"]:
        engine.adapters.load(name, str(fixture.dir / name))
    for name, path in (extra or {}).items():
        engine.adapters.load(name, str(path))
    return engine


def test_kinds_and_what_the_registry_keeps(fixture):
    assert [detect_kind(str(fixture.dir / c)) for c in CASES] == [ADAPTERHUB_PREFIX, ADAPTERHUB_PREFIX,
                                                                  ADAPTERHUB_UNION]
    engine = engine_with(fixture)
    prefix, flat, mam = (engine.adapters.get(c) for c in CASES)
    assert (prefix.info["num_virtual_tokens"], flat.info["num_virtual_tokens"], mam.info["num_virtual_tokens"]) \
        == (5, 4, 6)
    assert prefix.info["first_position"] == flat.info["first_position"] == mam.info["first_position"] == 0
    assert mam.info["part_kinds"] == (ADAPTERHUB_PREFIX, BOTTLENECK)
    assert mam.info["rank"] == 8                      # its bottleneck: hidden 64 / reduction_factor 8
    # the prefix K/V of every layer (6 tokens) plus the bottleneck's tensors
    kv_bytes = 2 * 3 * 6 * 2 * 16 * 4
    bn_bytes = 3 * (8 * 64 + 8 + 64 * 8 + 64) * 4
    assert mam.num_bytes == kv_bytes + bn_bytes
    assert all(h.slot is not None for h in (prefix, flat, mam))


def test_each_alone_matches_adapterhub(fixture):
    """Every prompt of each case as a request alone; each adapter changes the output vs the base model."""
    engine = engine_with(fixture)
    for case in CASES:
        for i, prompt in enumerate(fixture.prompts):
            tokens, logits = run(engine, [(prompt, case, None, 0)], fixture.max_new)
            want_tokens, want_logits = fixture.expected(case, i)
            assert tokens[0] == want_tokens, (case, i)
            torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0, msg=f"{case} prompt {i}")
            base_logits = fixture.expected("base", i)[1]
            assert (logits[0] - base_logits).abs().max() > 0.5, (case, i)
        assert fixture.manifest["cases"][case]["tokens"] != fixture.manifest["cases"]["base"]["tokens"]


def test_mixed_batch_with_peft_lora_peft_prefix_bottleneck_and_base(fixture, peft_adapters):
    """All three cases, an AdapterHub parallel bottleneck adapter, PEFT LoRA, PEFT prefix tuning and base requests
    in one staggered batch, prefills chunked by a 16-token budget: each equals its reference."""
    dirs, refs = peft_adapters
    engine = engine_with(fixture, dirs, max_num_batched_tokens=16, max_num_seqs=64)
    requests, want = [], []
    for n, case in enumerate([*CASES, "par_bn", "base"]):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, None if case == "base" else case, None, (n + i) % 4))
            want.append(fixture.expected(case, i))
    for n, name in enumerate(dirs):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, name, None, (2 * n + i) % 3))
            want.append(refs[name][i])
    tokens, logits = run(engine, requests, fixture.max_new)
    for (prompt, adapter, _, _), got_tokens, got_logits, (want_tokens, want_logits) in zip(
            requests, tokens, logits, want):
        assert got_tokens == want_tokens, (adapter, prompt)
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0, msg=f"{adapter} {prompt}")


def test_peft_and_adapterhub_prefixes_in_one_step(fixture, peft_adapters):
    """A PEFT prefix (own tokens at positions 3, 4, ...) and AdapterHub prefixes (0, 1, ...) decode in the same
    steps: the positions the model gets differ per request, and each answer equals its reference."""
    dirs, refs = peft_adapters
    engine = engine_with(fixture, {"peft_prefix": dirs["peft_prefix"]})
    positions = []
    build_meta = engine.runner.build_meta

    def recording(order):
        meta, sampled = build_meta(order)
        positions.append({item.seq.adapter.name: meta.positions[row].item()
                          for item, row in zip(order, _rows(order)) if item.seq.adapter is not None})
        return meta, sampled
    engine.runner.build_meta = recording
    prompt = fixture.prompts[2]
    tokens, logits = run(engine, [(prompt, "peft_prefix", None, 0), (prompt, "prefix", None, 0),
                                  (prompt, "mam", None, 0)], fixture.max_new)
    assert positions[0] == {"peft_prefix": 3, "prefix": 0, "mam": 0}      # first prompt token of each
    assert len(positions) == fixture.max_new and all(len(p) == 3 for p in positions)
    for got_tokens, got_logits, (want_tokens, want_logits) in zip(
            tokens, logits, [refs["peft_prefix"][2], fixture.expected("prefix", 2), fixture.expected("mam", 2)]):
        assert got_tokens == want_tokens
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)


def _rows(order) -> list[int]:
    rows, row = [], 0
    for item in order:
        rows.append(row)
        row += item.num_tokens
    return rows


def _edited(fixture, tmp_path, case: str, edit) -> str:
    """A copy of fixture adapter `case` with its "config" changed by `edit(config)`."""
    out = tmp_path / f"{case}-edited"
    shutil.copytree(fixture.dir / case, out)
    d = json.loads((out / "adapter_config.json").read_text())
    edit(d["config"])
    (out / "adapter_config.json").write_text(json.dumps(d))
    return str(out)


@pytest.mark.parametrize("case, edit, message", [
    ("prefix", lambda c: c.update(use_gating=True), "use_gating=True"),
    ("prefix_flat", lambda c: c.update(leave_out=[1]), r"leave_out=\[1\]"),
    ("prefix", lambda c: c.update(prefix_length=7), "prefix_length 7"),
    ("mam", lambda c: c["configs"][0].update(leave_out=[0]), r"configs\[0\].*leave_out=\[0\]"),
    ("mam", lambda c: c["configs"].append(c["configs"][1]), r"configs\[2\]: a second bottleneck part"),
    ("mam", lambda c: c["configs"].append({"architecture": "union", "configs": []}),
     r"configs\[2\]: adapterhub_union is not served as a part of a union"),
    ("mam", lambda c: c["configs"].pop(1), "no part of the union uses: model.layers.0.output_adapters"),
    ("mam", lambda c: c["configs"][1].update(phm_layer=True), "phm_layer=True"),
])
def test_unservable_options_are_refused_by_name(fixture, tmp_path, case, edit, message):
    engine = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", kv_cache_memory="8MiB",
                                    block_size=4))
    with pytest.raises(AdapterError, match=message):
        engine.adapters.load("bad", _edited(fixture, tmp_path, case, edit))
    assert "bad" not in engine.adapters and all(slot is None for slot in engine.adapters.slots)
    engine.adapters.load("mam", str(fixture.dir / "mam"))          # the engine keeps serving
    tokens, _ = run(engine, [(fixture.prompts[0], "mam", None, 0)], fixture.max_new)
    assert tokens[0] == fixture.expected("mam", 0)[0]


def test_unload_frees_every_part(fixture):
    """Unloading a MAM adapter clears its slot in the bottleneck runtime and its prefix blocks; a bottleneck
    adapter then installed in that slot answers as itself."""
    engine = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", kv_cache_memory="8MiB",
                                    block_size=4))
    free = engine.scheduler.blocks.num_free
    slot = engine.adapters.load("mam", str(fixture.dir / "mam")).slot
    bottleneck = next(rt for rt in engine.runtimes if rt.name == "bottleneck")
    assert slot in bottleneck.adapters and engine.scheduler.blocks.num_free < free
    engine.adapters.unload("mam")
    assert slot not in bottleneck.adapters and engine.scheduler.blocks.num_free == free
    assert engine.adapters.load("par_bn", str(fixture.dir / "par_bn")).slot == slot
    tokens, logits = run(engine, [(fixture.prompts[1], "par_bn", None, 0)], fixture.max_new)
    assert tokens[0] == fixture.expected("par_bn", 1)[0]
    torch.testing.assert_close(logits[0], fixture.expected("par_bn", 1)[1], atol=ATOL, rtol=0)


def test_adapter_drop_of_every_layer_is_the_base(fixture):
    """AdapterDrop of all layers (AdapterHub's skip_layers = every layer) leaves neither the prefix nor the
    bottleneck anywhere, and the request's own positions still start at 0: exactly the base model's output."""
    engine = engine_with(fixture)
    layers = engine.runner.spec.num_layers
    requests = [(prompt, case, layers, 0) for case in CASES for prompt in fixture.prompts]
    tokens, logits = run(engine, requests, fixture.max_new)
    for (prompt, case, _, _), got_tokens, got_logits in zip(requests, tokens, logits):
        want_tokens, want_logits = fixture.expected("base", fixture.prompts.index(prompt))
        assert got_tokens == want_tokens, case
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0, msg=case)
