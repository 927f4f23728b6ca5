"""kernels/paged_decode: the C decode-attention kernel reading KV blocks in place equals its torch reference
(gather + SDPA), and the model's decode steps run through it with outputs equal to transformers'."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import decode_layers as dl
from kernels import paged_decode as pd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_case(seed, *, b, h, kvh, d, bs, lens, dtype=torch.float32, window=None, pads=None, strided_q=True):
    """Random caches, scattered block tables and masks as the runner builds them (causal up to each sequence's
    length, optionally a sliding window and left padding)."""
    g = torch.Generator().manual_seed(seed)
    nb = max((n + (pads or [0] * b)[i] + bs - 1) // bs for i, n in enumerate(lens))
    num_blocks = b * nb + 5
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:b * nb].view(b, nb).contiguous()
    if strided_q:              # q as the model has it: the head columns of a wider qkv row
        q = torch.randn(b, (h + 2 * kvh) * d, generator=g).to(dtype)[:, :h * d].view(b, h, d)
    else:
        q = torch.randn(b, h, d, generator=g).to(dtype)
    kpos = torch.arange(nb * bs)[None] - torch.tensor(pads or [0] * b)[:, None]
    qpos = torch.tensor(lens)[:, None] - 1
    mask = (kpos >= 0) & (kpos <= qpos)
    if window is not None:
        mask &= kpos > qpos - window
    return q, k_cache, v_cache, tables, mask


CASES = {
    "mha": dict(b=5, h=4, kvh=4, d=16, bs=4, lens=[1, 7, 13, 4, 16]),
    "gqa": dict(b=6, h=9, kvh=3, d=64, bs=16, lens=[40, 1, 17, 64, 33, 2]),
    "mqa-one-seq-long": dict(b=1, h=8, kvh=1, d=32, bs=16, lens=[700]),
    "window": dict(b=4, h=4, kvh=2, d=32, bs=4, lens=[3, 11, 20, 9], window=5),
    "left-pad": dict(b=3, h=4, kvh=2, d=16, bs=4, lens=[5, 9, 2], pads=[3, 0, 6]),
    "q-contiguous": dict(b=4, h=6, kvh=2, d=128, bs=8, lens=[30, 8, 1, 17], strided_q=False),
    "head-dim-40": dict(b=3, h=6, kvh=2, d=40, bs=8, lens=[9, 23, 3]),             # a 16-lane tail
    "group-of-7": dict(b=2, h=14, kvh=2, d=64, bs=16, lens=[50, 7]),                 # Qwen2-0.5B's grouping
    "group-of-17": dict(b=2, h=34, kvh=2, d=16, bs=4, lens=[6, 13]),                 # a long loop over heads
    "block-of-24": dict(b=3, h=4, kvh=2, d=48, bs=24, lens=[50, 24, 7]),             # a tile of 16 and one of 8
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_the_reference(name):
    q, kc, vc, tables, mask = make_case(0, **CASES[name])
    assert pd.supports(q, kc, vc, tables, mask)
    out = pd.paged_decode(q, kc, vc, tables, mask, 0.17)
    ref = pd.paged_decode_ref(q, kc, vc, tables, mask, 0.17)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "window", "left-pad"])
def test_bf16_matches_fp32_math_rounded_once(name):
    """bf16 caches: the kernel accumulates in fp32 and rounds the output once, so it is within one bf16 rounding
    of the fp32 reference on the same (bf16-valued) inputs."""
    q, kc, vc, tables, mask = make_case(1, dtype=torch.bfloat16, **CASES[name])
    out = pd.paged_decode(q, kc, vc, tables, mask, 0.125)
    assert out.dtype == torch.bfloat16
    ref = pd.paged_decode_ref(q.float(), kc.float(), vc.float(), tables, mask, 0.125)
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=2 ** -8)
    torch.testing.assert_close(out, pd.paged_decode_ref(q, kc, vc, tables, mask, 0.125), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_portable_build_without_avx512_agrees(tmp_path, dtype):
    """kernels/attend.h's plain-C item (machines without AVX-512), built for x86-64-v3 or the host without
    -march, against the same reference."""
    import ctypes
    import platform
    flags = ["-march=x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else []
    lib = tmp_path / "paged_portable.so"
    subprocess.run(["cc", "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(lib),
                    os.path.join(REPO, "kernels", "paged_decode.c"), "-lm"], check=True, capture_output=True)
    fn = getattr(ctypes.CDLL(str(lib)), pd.DTYPES[dtype])
    fn.restype = None
    fn.argtypes = getattr(pd._library(), pd.DTYPES[dtype]).argtypes
    for name in ("gqa", "head-dim-40", "left-pad"):
        q, kc, vc, tables, mask = make_case(5, dtype=dtype, **CASES[name])
        b, h, d = q.shape
        out = q.new_empty(b, h, d)
        fn(q.data_ptr(), q.stride(0), q.stride(1), kc.data_ptr(), vc.data_ptr(), tables.data_ptr(), mask.data_ptr(),
           mask.stride(0), out.data_ptr(), b, h, kc.shape[2], d, tables.shape[1], kc.shape[1], 0.2, 2)
        ref = pd.paged_decode_ref(q.float(), kc.float(), vc.float(), tables, mask, 0.2)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=2 ** -8)
        torch.testing.assert_close(out.float(), ref, **tol)


def test_the_output_depends_on_the_blocks_it_is_given():
    """Non-vacuous: swapping two sequences' block tables swaps their outputs; a masked key does not count."""
    q, kc, vc, tables, mask = make_case(2, **CASES["mha"])
    out = pd.paged_decode(q, kc, vc, tables, mask, 0.25)
    swapped = tables[[1, 0, 2, 3, 4]].contiguous()
    mask2 = mask.clone()
    mask2[[0, 1]] = mask[[1, 0]]
    out2 = pd.paged_decode(q, kc, vc, swapped, mask2, 0.25)
    assert not torch.allclose(out[0], out2[0])
    torch.testing.assert_close(out2[0], pd.paged_decode_ref(q, kc, vc, swapped, mask2, 0.25)[0], atol=1e-5, rtol=0)
    kc2 = kc.clone()
    masked = ~mask[2]
    masked_rows = masked.nonzero()[:, 0]
    for key in masked_rows.tolist():
        kc2[tables[2, key // 4], key % 4] = 1e4           # poison keys the mask hides
    torch.testing.assert_close(pd.paged_decode(q, kc2, vc, tables, mask, 0.25)[2], out[2], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_its_batch(dtype):
    """A long sequence is cut into pieces (kernels/attend.h) by its own length alone: alone or next to others
    (more work items, other threads), its output is the same bit for bit, and equals the reference."""
    q, kc, vc, tables, mask = make_case(6, dtype=dtype, b=3, h=9, kvh=3, d=64, bs=16, lens=[900, 40, 300])
    together = pd.paged_decode(q, kc, vc, tables, mask, 0.125)
    for i in range(3):
        alone = pd.paged_decode(q[i:i + 1], kc, vc, tables[i:i + 1].contiguous(), mask[i:i + 1], 0.125)
        assert torch.equal(alone[0], together[i])
    ref = pd.paged_decode_ref(q.float(), kc.float(), vc.float(), tables, mask, 0.125)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=2 ** -8)
    torch.testing.assert_close(together.float(), ref, **tol)


def test_a_row_with_no_attended_key_is_zero():
    q, kc, vc, tables, mask = make_case(3, **CASES["mha"])
    mask[1] = False
    out = pd.paged_decode(q, kc, vc, tables, mask, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], pd.paged_decode_ref(q, kc, vc, tables, mask, 0.25)[0], atol=1e-5, rtol=0)


def test_unsupported_inputs_are_refused():
    q, kc, vc, tables, mask = make_case(4, **CASES["mha"])
    assert not pd.supports(q.half(), kc.half(), vc.half(), tables, mask)           # fp16: no kernel
    assert not pd.supports(q, kc, vc, tables.int(), mask)
    assert not pd.supports(q, kc.transpose(0, 1), vc, tables, mask)
    assert not pd.supports(q, kc, vc, tables, mask[:, :-1])


def test_decode_steps_use_the_kernel_and_match_transformers(tiny_model_dir, monkeypatch):
    from server.model import attention
    from tests.test_model_vs_hf import engine_for, hf_reference, make_prompts, run_staggered
    from tests.tiny_models import load_hf
    path = tiny_model_dir("llama")
    calls = []
    real = pd.paged_decode

    def spy(q, *args):
        calls.append(q.shape[0])
        return real(q, *args)
    monkeypatch.setattr(attention.pd, "paged_decode", spy)
    monkeypatch.setattr(dl, "supports", lambda *a: False)     # the module path (not the whole-stack kernel)
    prompts = make_prompts(5, [3, 9, 14])
    tokens, logits = run_staggered(engine_for(path), prompts, [0, 0, 2])
    assert calls and max(calls) == 3                       # decode groups went through the kernel
    hf = load_hf(path)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert tokens[i] == ref_tokens
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")
def test_the_kernel_runs_on_torchs_openmp_team():
    """Linked against the libgomp torch loaded: a thread that already has torch's team adds no worker when it
    calls the kernel (a second OpenMP runtime would start its own team, and two teams on few cores stop
    spinning; see kernels/cpu_threads.py)."""
    script = textwrap.dedent("""
        import os, threading, time, torch
        from kernels import paged_decode as pd
        from tests.kernels.test_paged_decode import make_case, CASES
        assert pd.available()
        def native():
            return len(os.listdir("/proc/self/task")) - len(threading.enumerate())
        base = native()
        counts = []
        def work():
            torch.ones(1 << 22).mul_(2)
            time.sleep(0.2)
            counts.append(native())
            pd.paged_decode(*make_case(0, **CASES["gqa"]), 0.1)
            time.sleep(0.2)
            counts.append(native())
        t = threading.Thread(target=work)
        t.start(); t.join()
        print(base, *counts)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    base, with_team, after_kernel = map(int, done.stdout.split())
    assert with_team == base + 1
    assert after_kernel == with_team
