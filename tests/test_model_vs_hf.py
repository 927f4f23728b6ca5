"""Our runtime vs transformers on the same weights: greedy tokens identical, logits within 1e-4 (fp32).

Each request is compared with transformers' `generate` run on it alone; ours runs it alone and inside mixed
batches whose members have different prompt lengths and arrive at different steps.
"""
from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams
from tests.tiny_models import CONFIGS, load_hf

MAX_NEW = 10
ATOL = 1e-4


def make_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def hf_reference(hf, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def capture_logits(engine: LLMEngine) -> dict[str, list[torch.Tensor]]:
    """Record the logits each request is sampled from (test-only wrapper around the runner)."""
    seen = defaultdict(list)
    run = engine.runner.run

    def recording_run(batch):
        sampled, logits = run(batch)
        for item, row in zip(sampled, logits):
            seen[item.seq.request_id].append(row.clone())
        return sampled, logits
    engine.runner.run = recording_run
    return seen


def run_staggered(engine: LLMEngine, prompts: list[list[int]], arrivals: list[int]):
    """Add prompt i at step arrivals[i]; run all to completion. Returns tokens and logits per prompt."""
    logits = capture_logits(engine)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    tokens = defaultdict(list)
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(f"r{i}", prompts[i], params)
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        step += 1
    return ([tokens[f"r{i}"] for i in range(len(prompts))],
            [torch.stack(logits[f"r{i}"]) for i in range(len(prompts))])


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_pair(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    return request.param, path, load_hf(path)


def engine_for(path, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "8MiB")
    kw.setdefault("block_size", 4)
    kw.setdefault("dtype", "float32")
    return LLMEngine(EngineConfig(model=str(path), **kw))


def test_single_requests_match_hf(model_pair):
    kind, path, hf = model_pair
    engine = engine_for(path)
    for prompt in make_prompts(1, [1, 7, 26]):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        tokens, logits = run_staggered(engine, [prompt], [0])
        assert tokens[0] == ref_tokens, kind
        torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)


def test_mixed_batch_staggered_arrivals_match_hf(model_pair):
    """Six prompts of different lengths join at different steps; a small token budget forces chunked
    prefills to share steps with other requests' decodes."""
    kind, path, hf = model_pair
    prompts = make_prompts(2, [3, 19, 8, 33, 1, 14])
    arrivals = [0, 0, 2, 3, 3, 7]
    engine = engine_for(path, max_num_batched_tokens=24)
    tokens, logits = run_staggered(engine, prompts, arrivals)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert tokens[i] == ref_tokens, (kind, i)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)


def test_preemption_recompute_keeps_outputs(tiny_model_dir):
    """A KV cache too small for all requests at once: sequences are preempted and recomputed, none dropped,
    every output still equals its solo run."""
    path = tiny_model_dir("llama")
    prompts = make_prompts(3, [20, 24, 28, 22])
    solo = [run_staggered(engine_for(path), [p], [0])[0][0] for p in prompts]
    # 3 layers * 2 * 4 tokens * 2 heads * 16 dims * 4 bytes = 3 KiB per block; 24 blocks = 96 tokens
    small = engine_for(path, kv_cache_memory=24 * 3072)
    preemptions = []
    schedule = small.scheduler.schedule
    small.scheduler.schedule = lambda: (lambda out: (preemptions.extend(out.preempted), out)[1])(schedule())
    tokens, _ = run_staggered(small, prompts, [0, 0, 0, 0])
    assert preemptions, "the test should exercise preemption"
    assert tokens == solo
    assert small.scheduler.blocks.num_used == 0
