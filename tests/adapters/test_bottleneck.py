"""AdapterHub bottleneck checkpoints: loading, refusals that name the option, and the grouped op vs the literal
per-adapter reference on mixed rows (every math option of the fixtures in one group)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.bottleneck import ATTENTION, MLP, load_bottleneck, reference_sublayer
from adapters.bottleneck_stacks import SublayerStacks, TokenGroup, grouped_sublayer
from adapters.config import BOTTLENECK, AdapterError, detect_kind

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"
LLAMA = FIXTURES / "llama"
HIDDEN, LAYERS = 64, 3


def bottleneck_dirs() -> list[Path]:
    manifest = json.loads((LLAMA / "expected.json").read_text())
    names = {n for case in manifest["cases"].values() if "adapterhub_error" not in case for n in case["adapters"]}
    return sorted(LLAMA / n for n in names if json.loads((LLAMA / n / "adapter_config.json").read_text())
                  ["config"].get("architecture") is None and not n.startswith("compacter"))


def test_every_fixture_option_loads():
    dirs = bottleneck_dirs()
    assert len(dirs) >= 20
    for d in dirs:
        assert detect_kind(str(d)) == BOTTLENECK
        adapter = load_bottleneck(str(d), HIDDEN, LAYERS)
        assert adapter.modules and adapter.num_bytes > 0


def test_layout_follows_the_config():
    houlsby = load_bottleneck(str(LLAMA / "double_seq_bn"), HIDDEN, LAYERS)
    assert set(houlsby.modules) == {(i, p) for i in range(LAYERS) for p in (ATTENTION, MLP)}
    assert houlsby.rank == HIDDEN // 16 and houlsby.math.non_linearity == "swish"
    leave_out = load_bottleneck(str(LLAMA / "seq_bn_rf_map_leave_out"), HIDDEN, LAYERS)
    assert {k: m.rank for k, m in leave_out.modules.items()} == {(0, MLP): 16, (2, MLP): 4}
    mh_only = load_bottleneck(str(LLAMA / "seq_bn_mh_only"), HIDDEN, LAYERS)
    assert set(mh_only.modules) == {(i, ATTENTION) for i in range(LAYERS)}


def test_scaling_is_folded_into_up():
    raw = load_file(LLAMA / "seq_bn_scaling_channel" / "adapter.safetensors")
    prefix = "model.layers.1.output_adapters.adapters.seq_bn_scaling_channel."
    module = load_bottleneck(str(LLAMA / "seq_bn_scaling_channel"), HIDDEN, LAYERS).modules[(1, MLP)]
    scaling = raw[prefix + "scaling"]
    torch.testing.assert_close(module.up_w, raw[prefix + "adapter_up.weight"] * scaling[:, None])
    torch.testing.assert_close(module.up_b, raw[prefix + "adapter_up.bias"] * scaling)


def test_bin_checkpoints_load_weights_only(tmp_path):
    a = load_bottleneck(str(LLAMA / "seq_bn_swish_rf8"), HIDDEN, LAYERS)          # pytorch_adapter.bin
    assert a.rank == 8
    evil = tmp_path / "evil"
    shutil.copytree(LLAMA / "seq_bn_swish_rf8", evil)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Boom()}, evil / "pytorch_adapter.bin")
    with pytest.raises(AdapterError, match="weights-only"):
        load_bottleneck(str(evil), HIDDEN, LAYERS)


def edited(tmp_path: Path, source: str, **options) -> Path:
    out = tmp_path / f"{source}-edited"
    shutil.copytree(LLAMA / source, out)
    d = json.loads((out / "adapter_config.json").read_text())
    d["config"].update(options)
    (out / "adapter_config.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("source, options, match", [
    ("seq_bn_post_add", {}, "residual_before_ln='post_add'"),
    ("compacter", {}, "phm_layer=True"),
    ("seq_bn", {"use_gating": True}, "use_gating=True"),
    ("seq_bn", {"inv_adapter": "nice"}, "inv_adapter='nice'"),
    ("seq_bn", {"non_linearity": "softmax"}, "non_linearity='softmax'"),
    ("seq_bn", {"scaling": "per_token"}, "scaling='per_token'"),
    ("seq_bn", {"original_ln_after": "yes"}, "original_ln_after must be true or false"),
    ("seq_bn", {"mh_adapter": False, "output_adapter": False}, "no module"),
    ("double_seq_bn", {"output_adapter": False}, "do not declare"),
    ("seq_bn", {"scaling": "learned"}, "missing scaling"),
    ("seq_bn", {"ln_after": True}, "missing adapter_norm_after"),
])
def test_unservable_options_are_named(tmp_path, source, options, match):
    with pytest.raises(AdapterError, match=match.replace("(", r"\(").replace(")", r"\)")):
        load_bottleneck(str(edited(tmp_path, source, **options)), HIDDEN, LAYERS)


def test_shape_and_key_errors(tmp_path):
    with pytest.raises(AdapterError, match="do not fit hidden_size 32"):
        load_bottleneck(str(LLAMA / "seq_bn"), 32, LAYERS)
    with pytest.raises(AdapterError, match="layer 2 but the base model has 2 layers"):
        load_bottleneck(str(LLAMA / "seq_bn"), HIDDEN, 2)
    bad = tmp_path / "bad"
    shutil.copytree(LLAMA / "seq_bn", bad)
    tensors = load_file(bad / "adapter.safetensors")
    tensors["model.invertible_adapters.seq_bn.F.0.weight"] = torch.zeros(2, 2)
    save_file(tensors, bad / "adapter.safetensors")
    with pytest.raises(AdapterError, match="unexpected tensor 'model.invertible_adapters"):
        load_bottleneck(str(bad), HIDDEN, LAYERS)


def test_grouped_op_equals_reference_on_mixed_rows():
    """Every fixture adapter in its own slot, rows interleaved in runs (several runs per slot), at every layer
    and position: the grouped op == the literal per-adapter reference (fp32, 1e-5)."""
    adapters = [load_bottleneck(str(d), HIDDEN, LAYERS) for d in bottleneck_dirs()]
    rng = random.Random(0)
    token_slots = [s for _ in range(3) for s in rng.sample(range(len(adapters)), len(adapters))
                   for _ in range(rng.randint(1, 3))]
    token_rows = sorted(rng.sample(range(2 * len(token_slots)), len(token_slots)))
    acts = {s: a.math.non_linearity for s, a in enumerate(adapters)}
    group = TokenGroup.build(token_rows, token_slots, acts, torch.device("cpu"))
    assert len(group.by_activation) > 2 and isinstance(group.rows, torch.Tensor)
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        for pos in (ATTENTION, MLP):
            stacks = SublayerStacks(HIDDEN, torch.float32, torch.device("cpu"))
            for slot in rng.sample(range(len(adapters)), len(adapters)):        # install order != slot order
                a = adapters[slot]
                stacks.set_slot(slot, a.modules.get((layer, pos)), a.math, len(adapters))
            o, r = torch.randn(len(token_slots), HIDDEN, generator=g), torch.randn(len(token_slots), HIDDEN, generator=g)
            got = grouped_sublayer(o, r, group, stacks)
            for i, slot in enumerate(token_slots):
                want = reference_sublayer(o[i:i + 1], r[i:i + 1], adapters[slot], layer, pos)
                torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5,
                                           msg=f"{adapters[slot].name} layer {layer} {pos}")


def test_cleared_slot_is_the_base_model():
    a = load_bottleneck(str(LLAMA / "seq_bn_ln_before_after"), HIDDEN, LAYERS)
    stacks = SublayerStacks(HIDDEN, torch.float32, torch.device("cpu"))
    stacks.set_slot(2, a.modules[(0, MLP)], a.math, 3)
    stacks.clear_slot(2)
    assert not stacks.ln_before and stacks.lnb_w is None
    group = TokenGroup.build([0, 1], [2, 2], {2: "relu"}, torch.device("cpu"))
    o, r = torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)
    assert torch.equal(grouped_sublayer(o, r, group, stacks), o + r)


def test_ranks_wider_than_the_kernels_are_chunked(monkeypatch):
    """On CUDA the Triton kernels take r <= 128: wider bottlenecks run in rank chunks. Forced on CPU (chunks of
    3) the result is the same."""
    import adapters.bottleneck_stacks as stacks_module
    adapter = load_bottleneck(str(LLAMA / "par_bn"), HIDDEN, LAYERS)          # r = 32
    stacks = SublayerStacks(HIDDEN, torch.float32, torch.device("cpu"))
    stacks.set_slot(0, adapter.modules[(1, MLP)], adapter.math, 1)
    group = TokenGroup.build([0, 1, 2], [0, 0, 0], {0: "relu"}, torch.device("cpu"))
    o, r = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    whole = grouped_sublayer(o, r, group, stacks)
    monkeypatch.setitem(stacks_module.MAX_KERNEL_RANK, "cpu", 3)
    assert len(stacks_module._chunks(32, torch.device("cpu"))) == 11
    torch.testing.assert_close(grouped_sublayer(o, r, group, stacks), whole, atol=1e-6, rtol=1e-6)
