"""kernels/lora_fused: a LoRA linear's shrink + every slice's expand in one C call equals the torch reference
(kernels/reference.py's sgmv_shrink + sgmv_expand), and the engine's decode steps use it with outputs equal to
PEFT's."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from kernels import lora_fused as lf
from kernels.segments import SegmentMeta

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (slice widths, their ranks) of the linears of a fused Llama layer, and a lone slice
LINEARS = {
    "qkv": ([64, 16, 16], [8, 4, 8]),
    "gate_up": ([96, 96], [16, 16]),
    "down": ([64], [2]),
    "wide": ([300], [16]),                     # more than one column block, a ragged last one
}


def make_case(seed, linear, lens, slots, *, base_rows=(), dtype=torch.float32, h_in=48, num_slots=5):
    """x with a wider row stride (a view), y a column window of a wider output (a view), segments of `lens`
    rows with `slots`, and `base_rows` extra rows in no segment before each segment."""
    g = torch.Generator().manual_seed(seed)
    widths, ranks = LINEARS[linear]
    r_total = sum(ranks)
    a = torch.randn(num_slots, r_total, h_in, generator=g).to(dtype)
    parts, r0, col = [], 0, 3
    for width, rank in zip(widths, ranks):
        b_t = torch.randn(num_slots, rank, width, generator=g).to(dtype)
        parts.append((b_t, r0, r0 + rank, col))
        r0, col = r0 + rank, col + width
    starts, at = [], 0
    for i, n in enumerate(lens):
        at += base_rows[i] if base_rows else 0
        starts.append(at)
        at += n
    num_tokens = at + 2
    x = torch.randn(num_tokens, h_in + 7, generator=g).to(dtype)[:, 2:2 + h_in]
    y = torch.randn(num_tokens, col + 5, generator=g).to(dtype)
    seg = SegmentMeta.from_segments(starts, lens, slots, num_tokens)
    return x, a, lf.slices(parts), seg, y


SEGMENTS = {
    "decode": ([1] * 6, [0, 1, 2, 3, 4, 0]),
    "decode-by-adapter": ([3, 2, 4], [4, 1, 2]),
    "empty-and-long": ([5, 0, 16, 1], [2, 3, 2, 0]),
    "prefill": ([70, 1, 133, 3], [1, 0, 3, 1]),    # prefill chunks longer than lf.BLOCK beside decodes
}


@pytest.mark.parametrize("linear", list(LINEARS))
@pytest.mark.parametrize("segments", list(SEGMENTS))
def test_fp32_matches_the_reference(linear, segments):
    lens, slots = SEGMENTS[segments]
    x, a, sl, seg, y = make_case(0, linear, lens, slots, base_rows=[1, 0, 2, 0, 1, 0][:len(lens)])
    assert lf.supports(x, a, sl, y)
    ref = lf.lora_fused_ref(x, a, sl, seg, y.clone())
    out = lf.lora_fused(x, a, sl, seg, y.clone())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)     # |delta| ~ 30: fp32 summation order


def test_rows_in_no_segment_and_other_columns_are_untouched():
    lens, slots = SEGMENTS["decode-by-adapter"]
    x, a, sl, seg, y = make_case(1, "qkv", lens, slots, base_rows=[2, 1, 1])
    out = lf.lora_fused(x, a, sl, seg, y.clone())
    covered = torch.zeros(y.shape[0], dtype=torch.bool)
    for start, n in zip(seg.start_list, seg.len_list):
        covered[start:start + n] = True
    assert torch.equal(out[~covered], y[~covered])
    assert torch.equal(out[:, :3], y[:, :3]) and torch.equal(out[:, -5:], y[:, -5:])
    assert not torch.allclose(out[covered], y[covered])                # the delta is not zero


def test_each_segment_uses_its_own_slot():
    lens, slots = SEGMENTS["decode"]
    x, a, sl, seg, y = make_case(2, "gate_up", lens, slots)
    out = lf.lora_fused(x, a, sl, seg, y.clone())
    moved = SegmentMeta.from_segments(seg.start_list, seg.len_list, [1, 1, 2, 3, 4, 0], seg.num_tokens)
    out2 = lf.lora_fused(x, a, sl, moved, y.clone())
    assert not torch.allclose(out[0], out2[0])                         # slot 0 -> 1 changes row 0
    torch.testing.assert_close(out[1:], out2[1:], atol=0, rtol=0)


def test_long_segments_are_cut_into_blocks_of_the_same_slot():
    lens, slots = SEGMENTS["prefill"]
    x, a, sl, seg, y = make_case(4, "qkv", lens, slots, base_rows=[2, 0, 1, 3])
    cut = lf.blocked(seg)
    assert cut.len_list == [64, 6, 1, 64, 64, 5, 3] and cut.slot_list == [1, 1, 0, 3, 3, 3, 1]
    assert cut.start_list == [2, 66, 72, 74, 138, 202, 210]
    assert lf.blocked(seg) is cut and lf.blocked(cut) is cut     # memoised; short segments stay as they are
    ref = lf.lora_fused_ref(x, a, sl, seg, y.clone())
    torch.testing.assert_close(lf.lora_fused(x, a, sl, cut, y.clone()), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("linear", ["qkv", "wide"])
@pytest.mark.parametrize("segments", ["empty-and-long", "prefill"])
def test_bf16_matches_the_reference(linear, segments):
    """bf16: the shrink output rounded to bf16 and y rounded once after the fp32 expand, as the reference does;
    the two differ only in fp32 summation order (at most one bf16 rounding step apart)."""
    lens, slots = SEGMENTS[segments]
    x, a, sl, seg, y = make_case(3, linear, lens, slots, dtype=torch.bfloat16)
    out = lf.lora_fused(x, a, sl, seg, y.clone())
    ref = lf.lora_fused_ref(x, a, sl, seg, y.clone())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.02, rtol=2 ** -7)
    assert (out != ref).float().mean() < 0.05


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_portable_build_without_avx512_agrees(tmp_path, monkeypatch, dtype):
    """kernels/lora.h's plain-C items (machines without AVX-512), built for x86-64-v3 or the host without -march,
    against the same reference."""
    import ctypes
    import platform
    flags = ["-march=x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else []
    path = tmp_path / "lora_portable.so"
    subprocess.run(["cc", "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(path),
                    os.path.join(REPO, "kernels", "lora_fused.c"), "-lm"], check=True, capture_output=True)
    portable = ctypes.CDLL(str(path))
    for name in lf.DTYPES.values():
        getattr(portable, name).restype = None
        getattr(portable, name).argtypes = getattr(lf._library(), name).argtypes
    monkeypatch.setattr(lf, "_library", lambda: portable)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=2 ** -7)
    for linear, segments in [("qkv", "decode-by-adapter"), ("wide", "empty-and-long")]:
        lens, slots = SEGMENTS[segments]
        x, a, sl, seg, y = make_case(7, linear, lens, slots, dtype=dtype)
        out = lf.lora_fused(x, a, sl, seg, y.clone())
        torch.testing.assert_close(out.float(), lf.lora_fused_ref(x, a, sl, seg, y.clone()).float(), **tol)
        assert not torch.allclose(out.float(), y.float())


def test_unsupported_inputs_are_refused():
    x, a, sl, seg, y = make_case(4, "qkv", [2], [0])
    assert not lf.supports(x.half(), a.half(), sl, y.half())
    assert not lf.supports(x, a.transpose(1, 2).contiguous().transpose(1, 2), sl, y)
    other = lf.slices([(b.transpose(1, 2).contiguous().transpose(1, 2), r0, r1, c)
                       for b, (r0, r1, c) in zip(sl.b_t, sl.table[:3].T.tolist())])
    assert not lf.supports(x, a, other, y)


def test_engine_decode_uses_the_kernel_and_matches_peft(tiny_model_dir, tmp_path, monkeypatch):
    from peft import LoraConfig

    from tests.peft_fixtures import load_peft, save_adapter
    from tests.test_lora_vs_peft import BASE, engine_with, peft_reference, run_with_adapters
    from tests.test_model_vs_hf import make_prompts
    base = tiny_model_dir("llama")
    dirs = {name: save_adapter(base, LoraConfig(r=r, target_modules="all-linear", init_lora_weights=False),
                               tmp_path / name, seed=seed)
            for name, r, seed in (("a", 8, 1), ("b", 4, 2))}
    import kernels
    calls = {"fused": [], "torch": []}
    real_fused, real_shrink = lf.lora_fused, kernels.sgmv_shrink

    def spy_fused(x, a, sl, seg, y):
        calls["fused"].append(sorted(n for n in seg.len_list if n))
        return real_fused(x, a, sl, seg, y)

    def spy_shrink(x, a, seg):
        calls["torch"].append(min(n for n in seg.len_list if n))
        return real_shrink(x, a, seg)
    monkeypatch.setattr(lf, "lora_fused", spy_fused)
    monkeypatch.setattr(kernels, "sgmv_shrink", spy_shrink)
    # the 150-token prompt's prefill (longer than lf.BLOCK) shares a step with the others' decodes
    prompts = make_prompts(7, [4, 9, 6, 150])
    names = ["a", "b", BASE, "a"]
    engine = engine_with(base, dirs)
    tokens, logits = run_with_adapters(engine, prompts, names, [0, 0, 1, 2])
    assert not calls["torch"]                                       # every segment went through the kernel
    assert max(max(lens) for lens in calls["fused"]) == lf.BLOCK   # the long prefill in blocks
    mixed = [lens for lens in calls["fused"] if lens[0] == 1 and lens[-1] == lf.BLOCK]
    assert mixed and any(22 in lens for lens in mixed)              # 150 = 64 + 64 + 22, beside decode rows
    peft_model = load_peft(base, dirs)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        ref_tokens, ref_logits = peft_reference(peft_model, prompt, name)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0)
    assert tokens[0] != run_with_adapters(engine, prompts[:1], [BASE], [0])[0][0]
