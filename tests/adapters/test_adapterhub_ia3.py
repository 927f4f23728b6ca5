"""AdapterHub (IA)^3 checkpoints: detection, the vectors (alpha folded) on the modules the tensor names give,
and refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.adapterhub_ia3 import load_adapterhub_ia3
from adapters.config import ADAPTERHUB_IA3, ADAPTERHUB_LORA, AdapterError, detect_kind

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"
OUT = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 128, "up_proj": 128, "down_proj": 64}


def test_llama_default_scales_k_v_down():
    path = FIXTURES / "llama" / "ia3"
    assert detect_kind(str(path)) == ADAPTERHUB_IA3
    adapter = load_adapterhub_ia3(str(path), OUT, 3)
    assert set(adapter.output) == {(i, m) for i in range(3) for m in ("k_proj", "v_proj", "down_proj")}
    raw = load_file(path / "adapter.safetensors")
    torch.testing.assert_close(adapter.output[(1, "v_proj")],
                               raw["model.layers.1.self_attn.v_proj.loras.ia3.lora_B"].reshape(-1))
    assert not adapter.input and adapter.num_bytes == 3 * (32 + 32 + 64) * 4


def test_alpha_is_folded_and_targets_follow_the_tensors():
    path = FIXTURES / "llama" / "ia3_alpha2_qv_up"
    adapter = load_adapterhub_ia3(str(path), OUT, 3)
    assert {m for _, m in adapter.output} == {"q_proj", "v_proj", "up_proj"}
    raw = load_file(path / "adapter.safetensors")
    torch.testing.assert_close(adapter.output[(0, "up_proj")],
                               2 * raw["model.layers.0.mlp.up_proj.loras.ia3_alpha2_qv_up.lora_B"].reshape(-1))
    qwen = load_adapterhub_ia3(str(FIXTURES / "qwen2" / "ia3"), OUT, 2)     # the plugin interface: up_proj
    assert {m for _, m in qwen.output} == {"k_proj", "v_proj", "up_proj"}


def edited(tmp_path: Path, **options) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(FIXTURES / "llama" / "ia3", out)
    d = json.loads((out / "adapter_config.json").read_text())
    d["config"].update(options)
    (out / "adapter_config.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("options, match", [
    ({"use_gating": True}, "use_gating=True"),
    ({"r": 2}, "needs r=1"),
    ({"alpha": "big"}, "alpha must be a number"),
])
def test_refusals_name_the_option(tmp_path, options, match):
    with pytest.raises(AdapterError, match=match):
        load_adapterhub_ia3(str(edited(tmp_path, **options)), OUT, 3)


def test_additive_adapterhub_lora_is_another_kind(tmp_path):
    assert detect_kind(str(edited(tmp_path, composition_mode="add"))) == ADAPTERHUB_LORA


def test_shape_mismatch(tmp_path):
    with pytest.raises(AdapterError, match="k_proj has 16 outputs"):
        load_adapterhub_ia3(str(FIXTURES / "llama" / "ia3"), dict(OUT, k_proj=16), 3)
