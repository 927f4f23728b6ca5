"""AdapterHub AdapterFusion (`Fuse("fuse_a", "fuse_b")`, dynamic config) vs AdapterHub 1.3.0 itself: greedy tokens
identical and logits within 1e-4 (fp32) against the committed fixture (tests/fixtures/adapterhub/llama, case
"fusion"), solo and in one staggered, chunked batch with its own members, a PEFT LoRA and base requests; the
grouped op vs the literal transcription of AdapterHub's forward for the other options; refusals name what is
missing or unserved, and the engine keeps serving."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from adapters.bottleneck import MLP, load_bottleneck
from adapters.config import ADAPTERHUB_FUSION, FUSION_CONFIG_NAME, AdapterError, detect_kind
from adapters.fusion import SAFETENSORS_NAME, load_fusion, read_fusion_config, reference_fusion
from adapters.fusion_stacks import FusionStack, fused_sublayer
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.test_adapterhub_vs_fixtures import ATOL, Fixture, engine_for, run

FUSION = "fusion_fuse_a_fuse_b"
MEMBERS = ("fuse_a", "fuse_b")


@pytest.fixture(scope="module")
def llama(tokenizer_dir, tmp_path_factory) -> Fixture:
    return Fixture("llama", tokenizer_dir, tmp_path_factory.mktemp("fusion"))


def fusion_engine(fixture: Fixture, extra: dict | None = None, **kw):
    """An engine with the fixture's bottleneck cases (fuse_a, fuse_b among them) and then the fusion loaded."""
    engine = engine_for(fixture, extra, **kw)
    engine.adapters.load("fusion", str(fixture.dir / FUSION))
    return engine


def test_fixture_is_the_fusion_of_its_members(llama):
    case = llama.manifest["cases"]["fusion"]
    assert case["adapters"] == list(MEMBERS) and case["fusion_dir"] == FUSION
    assert detect_kind(str(llama.dir / FUSION)) == ADAPTERHUB_FUSION
    assert read_fusion_config(str(llama.dir / FUSION)).adapter_names == MEMBERS
    assert case["max_abs_diff_vs_base"] > 0.5
    base = llama.manifest["cases"]["base"]["tokens"]
    for other in (base, *(llama.manifest["cases"][m]["tokens"] for m in MEMBERS)):
        assert case["tokens"] != other                     # AdapterHub's fusion answers unlike base and members


def test_fusion_alone_matches_adapterhub(llama):
    engine = fusion_engine(llama)
    assert engine.adapters.get("fusion").kind == ADAPTERHUB_FUSION
    for i, prompt in enumerate(llama.prompts):
        tokens, logits = run(engine, [(prompt, "fusion", None, 0)], llama.max_new)
        want_tokens, want_logits = llama.expected("fusion", i)
        assert tokens[0] == want_tokens, i
        torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0, msg=f"prompt {i}")


def test_fusion_in_a_mixed_batch_with_members_lora_and_base(llama, tmp_path):
    """Fusion, fuse_a, fuse_b, PEFT LoRA and base requests in one staggered batch, prefills chunked by a 16-token
    budget: each equals its reference; the fusion's logits differ from base's and from each member's. A fusion
    request dropping every layer (AdapterDrop) is the base model."""
    lora = save_adapter(llama.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                               init_lora_weights=False), tmp_path / "lora", seed=3)
    lora_ref = [greedy_full_forward(load_peft(llama.base, {"peft_lora": lora}), p, llama.max_new)
                for p in llama.prompts]
    engine = fusion_engine(llama, {"peft_lora": lora}, max_num_batched_tokens=16, max_num_seqs=64)
    num_layers = engine.runner.spec.num_layers
    requests, want = [], []
    for n, (model, case, drop) in enumerate([("fusion", "fusion", None), ("fuse_a", "fuse_a", None),
                                             (None, "base", None), ("fuse_b", "fuse_b", None),
                                             ("peft_lora", None, None), ("fusion", "base", num_layers)]):
        for i, prompt in enumerate(llama.prompts):
            requests.append((prompt, model, drop, (n + i) % 4))
            want.append(lora_ref[i] if case is None else llama.expected(case, i))
    tokens, logits = run(engine, requests, llama.max_new)
    for (prompt, model, drop, _), got_tokens, got_logits, (want_tokens, want_logits) in zip(
            requests, tokens, logits, want):
        assert got_tokens == want_tokens, (model, drop, prompt)
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0, msg=f"{model} drop {drop}")
    k = len(llama.prompts)
    fusion = torch.stack(logits[:k])
    for other in (logits[k:2 * k], logits[2 * k:3 * k], logits[3 * k:4 * k]):     # fuse_a, base, fuse_b
        assert (fusion - torch.stack(other)).abs().max() > 0.5


def test_members_not_loaded_are_named(llama):
    """Loading a fusion before its members is an AdapterError naming the missing ones (also a member loaded under
    its name that is not a bottleneck adapter); the engine keeps serving."""
    engine = engine_for(llama)
    engine.adapters.unload("fuse_b")
    with pytest.raises(AdapterError, match=r"not loaded: 'fuse_b';") as e:
        engine.adapters.load("fusion", str(llama.dir / FUSION))
    assert "'fuse_a'" not in str(e.value).split("not loaded:")[1].split(";")[0]
    assert "fusion" not in engine.adapters
    engine.adapters.load("fuse_b", str(llama.dir / "ia3"))
    with pytest.raises(AdapterError, match="'fuse_b' is a adapterhub_ia3 adapter"):
        engine.adapters.load("fusion", str(llama.dir / FUSION))
    tokens, _ = run(engine, [(llama.prompts[0], "fuse_a", None, 0)], llama.max_new)
    assert tokens[0] == llama.expected("fuse_a", 0)[0]


def test_fusion_survives_unloading_its_members(llama):
    """The fusion holds its members' modules: unloading them changes nothing, and a re-read of the fusion (what
    the disk tier does) finds them at the paths they had."""
    engine = fusion_engine(llama)
    for name in MEMBERS:
        engine.adapters.unload(name)
    assert engine.adapters.read(str(llama.dir / FUSION)).kind == ADAPTERHUB_FUSION
    tokens, logits = run(engine, [(llama.prompts[1], "fusion", None, 0)], llama.max_new)
    assert tokens[0] == llama.expected("fusion", 1)[0]
    torch.testing.assert_close(logits[0], llama.expected("fusion", 1)[1], atol=ATOL, rtol=0)


def _fusion_dir(root: Path, names: list[str], options: dict, seed: int, num_layers: int = 3,
                hidden: int = 64) -> Path:
    """A fusion directory as save_adapter_fusion writes it, with random fusion weights."""
    name = ",".join(names)
    config = {"query": True, "key": True, "value": True, "query_before_ln": False, "regularization": True,
              "residual_before": False, "temperature": False, "value_before_softmax": True,
              "value_initialized": True, "dropout_prob": None, **options}
    out = root / f"fusion{seed}"
    out.mkdir()
    (out / FUSION_CONFIG_NAME).write_text(json.dumps({"adapter_names": names, "config": config, "name": name}))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.output_adapters.adapter_fusion_layer.{name}"
        for proj in ("query", "key", "value"):
            tensors[f"{prefix}.{proj}.weight"] = torch.randn(hidden, hidden, generator=g) / 4
            if proj != "value":
                tensors[f"{prefix}.{proj}.bias"] = torch.randn(hidden, generator=g) / 4
    save_file(tensors, out / SAFETENSORS_NAME)
    return out


@pytest.mark.parametrize("members, options", [
    (["fuse_a", "fuse_b"], {}),
    (["fuse_a", "fuse_b"], {"query": False}),
    (["fuse_b", "seq_bn_ln_before_after"], {"key": False}),                 # a member with its own ln_before
    (["fuse_b", "par_bn"], {"value": False}),                                # a parallel last member
    (["par_bn", "seq_bn_tanh_residual_after_ln"], {"value_before_softmax": False}),
    (["seq_bn_no_ln_before_after", "fuse_a", "seq_bn_gelu_no_ln_before"],   # 3 members, mixed activations
     {"query": False, "key": False, "value": False}),
])
def test_grouped_op_equals_adapterhub_forward_transcribed(llama, tmp_path, members, options):
    """fused_sublayer (what the runtime runs) vs reference_fusion (compose_fuse / BertFusion.forward /
    post_forward written out literally) for the options and member kinds the fixture does not cover."""
    path = _fusion_dir(tmp_path, members, options, seed=len(members) + len(options))
    adapters = [load_bottleneck(str(llama.dir / m), 64, 3) for m in members]
    fusion = load_fusion(str(path), read_fusion_config(str(path)), adapters, 64, 3)
    g = torch.Generator().manual_seed(0)
    o, r = torch.randn(7, 64, generator=g), torch.randn(7, 64, generator=g)
    for layer in range(3):
        stack = FusionStack.build(fusion, fusion.modules[(layer, MLP)], torch.float32, torch.device("cpu"))
        want = reference_fusion(o, r, fusion, layer, MLP)
        torch.testing.assert_close(fused_sublayer(o, r, stack), want, atol=1e-5, rtol=1e-5)
        assert (want - (o + r)).abs().max() > 0.1


@pytest.mark.parametrize("option, value", [("temperature", True), ("residual_before", True),
                                           ("query_before_ln", True)])
def test_unserved_fusion_option_is_named(llama, tmp_path, option, value):
    bad = tmp_path / "bad"
    shutil.copytree(llama.dir / FUSION, bad)
    config = json.loads((bad / FUSION_CONFIG_NAME).read_text())
    config["config"][option] = value
    (bad / FUSION_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=f"unsupported option {option}=True"):
        read_fusion_config(str(bad))


def test_members_with_modules_at_different_places_are_refused(llama, tmp_path):
    path = _fusion_dir(tmp_path, ["fuse_a", "seq_bn_mh_only"], {}, seed=9)
    adapters = [load_bottleneck(str(llama.dir / m), 64, 3) for m in ("fuse_a", "seq_bn_mh_only")]
    with pytest.raises(AdapterError, match="member 'fuse_a' has no module at layer 0 mh_adapter"):
        load_fusion(str(path), read_fusion_config(str(path)), adapters, 64, 3)
