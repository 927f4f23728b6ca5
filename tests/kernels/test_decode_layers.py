"""kernels/decode_layers: a decode step's whole decoder stack in one C call gives the module path's logits (fp32
to rounding; bf16 to bf16 rounding) and transformers' tokens, on every tiny architecture (GQA, llama3 RoPE, a
sliding window, qkv bias), with LoRA adapters as its ops gives PEFT's, a row's result does not depend on its
batch, and it steps aside where it does not apply (DoRA, prefill rows)."""
from __future__ import annotations

import pytest
import torch

from kernels import decode_layers as dl
from kernels import skinny_gemm as sk
from tests.test_model_vs_hf import capture_logits, engine_for, hf_reference, make_prompts, run_staggered
from tests.tiny_models import CONFIGS, load_hf


@pytest.fixture
def stack_calls(monkeypatch):
    """Rows of every decode_layers call the engine makes; each call's greedy tokens (the kernel's argmax, which
    the sampler takes) are checked against torch's first maximum of its logits."""
    calls = []
    real = dl.decode_layers

    def spy(h, *args, **kwargs):
        calls.append(h.shape[0])
        out = real(h, *args, **kwargs)
        assert torch.equal(out.row_argmax, out.max(dim=-1).indices)
        return out
    monkeypatch.setattr(dl, "decode_layers", spy)
    return calls


def module_path(monkeypatch):
    monkeypatch.setattr(dl, "supports", lambda *a: False)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_decode_steps_run_the_stack_and_match_transformers(kind, tiny_model_dir, stack_calls):
    path = tiny_model_dir(kind)
    prompts = make_prompts(11, [3, 15, 9])                  # the mistral window (12) is crossed
    engine = engine_for(path)
    tokens, logits = run_staggered(engine, prompts, [0, 0, 3])
    assert stack_calls and max(stack_calls) == 3            # decode-only steps of all three went through it
    assert min(stack_calls) < 3                             # and steps with fewer rows, on the same scratch:
    assert engine.runner.model._decode_stack.workspace.rows == 3      # one workspace, for the most rows seen
    hf = load_hf(path)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert tokens[i] == ref_tokens
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_stack_gives_the_module_paths_logits(dtype, tiny_model_dir, monkeypatch, stack_calls):
    path = tiny_model_dir("qwen2")
    prompts = make_prompts(4, [6, 2, 10, 5])
    tokens, logits = run_staggered(engine_for(path, dtype=dtype), prompts, [0, 1, 1, 4])
    assert stack_calls
    module_path(monkeypatch)
    ref_tokens, ref_logits = run_staggered(engine_for(path, dtype=dtype), prompts, [0, 1, 1, 4])
    tol = dict(atol=2e-5, rtol=0) if dtype == "float32" else dict(atol=0.1, rtol=0.02)   # logits ~ +-3
    for i in range(len(prompts)):
        torch.testing.assert_close(logits[i], ref_logits[i], **tol)
        if dtype == "float32":
            assert tokens[i] == ref_tokens[i]


def test_a_sequences_logits_do_not_depend_on_its_batch(tiny_model_dir, stack_calls):
    path = tiny_model_dir("llama")
    prompts = make_prompts(8, [5, 4, 6])      # prefill <= 16 rows: its matmuls are the row-wise kernel too
    _, together = run_staggered(engine_for(path), prompts, [0, 0, 0])
    _, alone = run_staggered(engine_for(path), prompts[1:2], [0])
    assert max(stack_calls) == 3 and 1 in stack_calls
    assert torch.equal(together[1][1:], alone[0][1:])       # every decode step's logits, bit for bit


def test_lora_decodes_run_in_the_stack_and_match_peft(tiny_model_dir, tmp_path, monkeypatch):
    """Two rank buckets (r 8 -> class 16, r 32 -> class 32) and base requests in the same decode steps: the
    adapters' deltas run as the kernel's LoRA ops, and every request equals PEFT's."""
    from peft import LoraConfig
    from tests.peft_fixtures import load_peft, save_adapter
    from tests.test_lora_vs_peft import BASE, engine_with, peft_reference, run_with_adapters
    path = tiny_model_dir("qwen2")
    dirs = {"small": save_adapter(path, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
                                  tmp_path / "small", 1),
            "wide": save_adapter(path, LoraConfig(r=32, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False), tmp_path / "wide", 2)}
    ops_seen = []
    real = dl.decode_layers

    def spy(h, ptrs, ops, *args, **kwargs):
        ops_seen.append(int(ptrs[:, 14::2].sum()))                # LoRA ops the layers point at
        return real(h, ptrs, ops, *args, **kwargs)
    monkeypatch.setattr(dl, "decode_layers", spy)
    prompts = make_prompts(3, [5, 9, 4, 7])
    adapters = ["small", BASE, "wide", "small"]
    tokens, logits = run_with_adapters(engine_with(path, dirs), prompts, adapters, [0, 0, 1, 1])
    assert ops_seen and max(ops_seen) > 0
    peft_model = load_peft(path, dirs)
    for i, (prompt, name) in enumerate(zip(prompts, adapters)):
        ref_tokens, ref_logits = peft_reference(peft_model, prompt, name)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0)
    assert tokens[0] != run_with_adapters(engine_with(path, dirs), prompts[:1], [BASE], [0])[0][0]


def test_lm_head_and_embedding_lora_in_the_stack_match_peft(tiny_model_dir, tmp_path, monkeypatch):
    """The step ends in the kernel (final norm, lm_head and its LoRA op); an embedding LoRA is added in Python
    before it (the kernel then takes the given rows instead of the token ids). Tokens and logits are PEFT's."""
    from peft import LoraConfig
    from tests.peft_fixtures import load_peft, save_adapter
    from tests.test_lora_vs_peft import BASE, engine_with, peft_reference, run_with_adapters
    path = tiny_model_dir("llama")
    dirs = {"head": save_adapter(path, LoraConfig(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj"],
                                                  init_lora_weights=False), tmp_path / "head", 6),
            "embed": save_adapter(path, LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"],
                                                   init_lora_weights=False), tmp_path / "embed", 7)}
    calls = []
    real = dl.decode_layers

    def spy(h, *args, ids=None, head=None, **kwargs):
        calls.append((ids is not None, head.ops[1]))            # token ids given to it?, the lm_head's LoRA ops
        return real(h, *args, ids=ids, head=head, **kwargs)
    monkeypatch.setattr(dl, "decode_layers", spy)
    prompts = make_prompts(12, [5, 7, 4])
    adapters = ["head", "embed", BASE]
    tokens, logits = run_with_adapters(engine_with(path, dirs), prompts, adapters, [0, 0, 1])
    assert (False, 1) in calls                 # a step with both adapters: embedding in Python, lm_head LoRA op
    peft_model = load_peft(path, dirs)
    for i, (prompt, name) in enumerate(zip(prompts, adapters)):
        if name == BASE:
            ref_tokens, ref_logits = hf_reference(load_hf(path), prompt)
        else:
            ref_tokens, ref_logits = peft_reference(peft_model, prompt, name)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0)
    alone, _ = run_with_adapters(engine_with(path, dirs), prompts[:1], [BASE], [0])
    assert tokens[0] != alone[0]                                # the lm_head adapter changes the output


def first_maximum(row: list[float]) -> int:
    """The index of a row's first maximum, NaN counting as the maximum (torch.max's rule), in plain Python."""
    nans = [i for i, v in enumerate(row) if v != v]
    return nans[0] if nans else row.index(max(row))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_argmax_is_the_first_maximum_with_ties_and_nans(dtype):
    """The stack's head alone (no layers): each row's argmax, scanned 16 lanes at a time in the threads' shares,
    is the first of tied maxima (within a lane, across lanes, across shares) and the first NaN."""
    g = torch.Generator().manual_seed(0)
    hidden, vocab, m = 64, 1000, 4
    dims = dl.Dims(hidden, 4, 2, 16, 128, 1e-6, 0.25)
    h = torch.randn(m, hidden, generator=g).abs().to(dtype)
    w = torch.randn(vocab, hidden, generator=g)
    w[[301, 305, 317, 700, 999]] = 5.0                       # tied maxima of every row (h > 0)
    head = dl.Head(torch.ones(hidden, dtype=dtype), w.to(dtype), None, (0, 0))

    def run(h, head):
        ptrs = torch.zeros(0, len(dl.FIELDS), dtype=torch.long)
        zeros = torch.zeros(m, dtype=torch.long)
        table = torch.zeros(1, dims.head_dim, dtype=dtype)
        out = dl.decode_layers(h.clone(), ptrs, None, dims, zeros, table, table, zeros,
                               torch.zeros(m, 1, dtype=torch.long), 16, head=head)
        return out, out.row_argmax.tolist()

    logits, found = run(h, head)
    assert found == [first_maximum(r) for r in logits.tolist()] == [301] * m
    h_nan = h.clone()
    h_nan[2, 5] = float("nan")                               # every logit of row 2 NaN: its first, 0
    w_nan = head.weight.clone()
    w_nan[[640, 650]] = float("nan")                         # every row's logits 640 and 650 NaN: the first
    logits, found = run(h_nan, dl.Head(head.norm, w_nan, None, (0, 0)))
    assert found == [first_maximum(r) for r in logits.tolist()] == [640, 640, 0, 640]


def test_rope_tables_equal_the_per_step_formula(tiny_model_dir):
    """The cached (cos, signed sin) rows are HF's rotary embedding of each position, also after the table grows."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    path = tiny_model_dir("llama")
    engine = engine_for(path)
    model = engine.runner.model
    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(path))
    for positions in (torch.tensor([0, 3, 17, 4095]), torch.tensor([9000, 5, 12345])):     # the second grows it
        cos, sin = model.rope(positions, torch.float32)
        ref_cos, ref_sin = rotary(torch.zeros(1), positions[None])
        half = ref_sin.shape[-1] // 2
        torch.testing.assert_close(cos[:, 0], ref_cos[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[:, 0, half:], ref_sin[0, :, half:], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[:, 0, :half], -ref_sin[0, :, :half], atol=1e-6, rtol=0)
    assert model.rope_tables(1, torch.float32)[0].shape[0] > 12345


def stack_matches_module_path(dtype, rows, tiny_model_dir, tmp_path, monkeypatch, stack_calls):
    """`rows` sequences (a third on the base model, the rest on a LoRA adapter) decode through the stack, then
    again through the module path: same logits (and greedy tokens in fp32)."""
    from peft import LoraConfig
    from tests.peft_fixtures import save_adapter
    from tests.test_lora_vs_peft import BASE, run_with_adapters
    path = tiny_model_dir("llama")
    lora = save_adapter(path, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False), tmp_path / "a", 5)
    prompts = make_prompts(9, [3 + i % 5 for i in range(rows)])
    adapters = ["a" if i % 3 else BASE for i in range(rows)]

    def run():
        engine = engine_for(path, dtype=dtype, max_num_seqs=rows)
        engine.adapters.load("a", str(lora))
        return run_with_adapters(engine, prompts, adapters, [0] * rows)
    tokens, logits = run()
    assert max(stack_calls) == rows
    module_path(monkeypatch)
    ref_tokens, ref_logits = run()
    tol = dict(atol=2e-5, rtol=0) if dtype == "float32" else dict(atol=0.1, rtol=0.02)
    for i in range(rows):
        torch.testing.assert_close(logits[i], ref_logits[i], **tol)
        if dtype == "float32":
            assert tokens[i] == ref_tokens[i]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_beyond_the_small_batch_rows_the_blas_driver_gives_the_module_paths_logits(dtype, tiny_model_dir, tmp_path,
                                                                                  monkeypatch, stack_calls):
    if not dl._blas()[dtype == "bfloat16"]:
        pytest.skip("torch's library exports no GEMM for this dtype here")
    rows = sk.MAX_ROWS[getattr(torch, dtype)] + 4                 # past the small-batch driver's rows
    stack_matches_module_path(dtype, rows, tiny_model_dir, tmp_path, monkeypatch, stack_calls)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_small_batch_driver_at_its_most_rows_gives_the_module_paths_logits(dtype, tiny_model_dir, tmp_path,
                                                                              monkeypatch, stack_calls):
    """As many rows as kernels/skinny_gemm.MAX_ROWS sends it (32 fp32 with AVX-512): several groups of four x rows
    per weight group in the small-batch matmul."""
    rows = sk.MAX_ROWS[getattr(torch, dtype)]
    stack_matches_module_path(dtype, rows, tiny_model_dir, tmp_path, monkeypatch, stack_calls)


def test_dora_takes_the_module_path_and_its_bucket_neighbours_do_not(tiny_model_dir, tmp_path, stack_calls):
    """A DoRA adapter's steps run layer by layer; a plain LoRA adapter in the same rank bucket keeps the stack
    (installing a DoRA adapter once sent every request of its bucket to the slow torch path) with the same
    outputs as without the DoRA adapter installed."""
    from peft import LoraConfig
    from server.sampling import SamplingParams
    from tests.peft_fixtures import save_adapter
    path = tiny_model_dir("llama")
    dora = save_adapter(path, LoraConfig(r=4, target_modules=["v_proj", "up_proj"], use_dora=True,
                                         init_lora_weights=False), tmp_path / "dora", 3)
    lora = save_adapter(path, LoraConfig(r=8, target_modules=["v_proj", "up_proj"], init_lora_weights=False),
                        tmp_path / "lora", 4)                   # ranks 4 and 8: the same rank class (16)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def run(engine, name):
        logits = capture_logits(engine)
        engine.add_request(name, [5, 6, 7], params, name)
        while engine.has_unfinished():
            engine.step()
        return torch.stack(logits[name])
    engine = engine_for(path)
    engine.adapters.load("d", str(dora))
    engine.adapters.load("l", str(lora))
    run(engine, "d")
    assert stack_calls == []
    with_dora = run(engine, "l")
    assert stack_calls == [1, 1, 1]
    alone = engine_for(path)
    alone.adapters.load("l", str(lora))
    torch.testing.assert_close(with_dora, run(alone, "l"), atol=1e-6, rtol=0)


def test_refuses_what_it_does_not_handle():
    d = dl.Dims(64, 4, 2, 16, 160, 1e-6, 0.25)
    assert dl.supports(torch.zeros(3, 64), d)
    assert not dl.supports(torch.zeros(3, 64).half(), d)
    beyond = sk.MAX_ROWS[torch.float32] + 1                              # beyond the small-batch GEMM: the BLAS
    assert dl.supports(torch.zeros(beyond, 64), d) == bool(dl._blas()[0])
    assert not dl.supports(torch.zeros(dl.MAX_ROWS + 1, 64), d)
    assert not dl.supports(torch.zeros(3, 128)[:, ::2], d)
    assert not dl.supports(torch.zeros(3, 64), dl.Dims(64, 4, 2, 1024, 160, 1e-6, 0.25))
