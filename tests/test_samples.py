"""n samples of one prompt on the engine: one prefill, shared blocks, and each sample's tokens equal to a request
of its own with that sample's seed (so copy-on-write kept every sample's KV right)."""
from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.engine import LLMEngine
from server.step_sampling import sample_seed
from server.sampling import SamplingParams

PROMPT = [5, 17, 33, 9, 120, 7, 64, 3, 200, 41]          # 10 tokens: with block_size 4 the last block is partial


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def make_engine(path, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "1MiB")
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", block_size=4, **kw))


def run(engine: LLMEngine, on_step=None) -> dict[tuple[str, int], list[int]]:
    tokens: dict[tuple[str, int], list[int]] = {}
    step = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            tokens.setdefault((out.request_id, out.index), []).extend(out.token_ids)
        step += 1
        if on_step is not None:
            on_step(step)
    return tokens


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 1.0, "ignore_eos": True, **kw})


def alone(engine: LLMEngine, prompt: list[int], seed: int, **kw) -> list[int]:
    engine.add_request("alone", prompt, params(seed=seed, **kw))
    return run(engine)[("alone", 0)]


@pytest.mark.parametrize("prompt", [PROMPT, PROMPT[:8]], ids=["partial-block", "block-aligned"])
def test_n_samples_equal_separate_requests_with_one_prefill(model_dir, prompt):
    engine = make_engine(model_dir)
    engine.add_request("r", prompt, params(seed=1234, n=3))
    tokens = run(engine)
    assert engine.num_prefill_tokens == len(prompt)                      # one prefill for 3 samples
    assert sorted(tokens) == [("r", 0), ("r", 1), ("r", 2)]
    expected = [alone(engine, prompt, sample_seed(1234, i)) for i in range(3)]
    assert [tokens[("r", i)] for i in range(3)] == expected
    assert len({tuple(t) for t in expected}) == 3                        # the samples differ
    assert expected[0] == alone(engine, prompt, 1234)                    # sample 0 = the n=1 request
    assert engine.scheduler.blocks.num_used == 0 and not engine.requests and not engine.samples


def test_samples_with_preemption_and_an_aborted_sample(model_dir):
    """A KV cache too small for every sample: samples get preempted and recomputed; aborting one sample
    midway leaves the others' tokens as they would be, and every block comes back."""
    block_bytes = 2 * 3 * 4 * 2 * 16 * 4           # K and V, 3 layers, 4 tokens, 2 KV heads of 16, fp32
    small = make_engine(model_dir, kv_cache_memory=12 * block_bytes)
    assert small.scheduler.blocks.num_blocks == 12      # 4 samples of 10 + 12 tokens need 4 * 6 alone
    small.add_request("r", PROMPT, params(seed=7, n=4))

    def abort_one(step):
        if step == 4:
            small.abort_request("r", index=2)
    tokens = run(small, abort_one)
    assert small.num_preemptions > 0
    assert small.scheduler.blocks.num_used == 0 and set(small.scheduler.blocks.ref_counts) == {0}
    reference = make_engine(model_dir)
    for i in (0, 1, 3):
        assert tokens[("r", i)] == alone(reference, PROMPT, sample_seed(7, i))
    assert len(tokens[("r", 2)]) < 12


def test_best_of_reports_cumulative_logprobs(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("r", PROMPT, params(seed=3, n=1, best_of=3, max_tokens=5))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.logprobs is None                  # computed to rank the samples, not returned
            if out.finished:
                finals[out.index] = out.cumulative_logprob
    assert sorted(finals) == [0, 1, 2] and all(lp < 0 for lp in finals.values())


def test_offline_generate_refuses_several_samples(model_dir):
    engine = make_engine(model_dir)
    with pytest.raises(ValueError, match="one sample per prompt"):
        engine.generate([PROMPT], params(n=2))
    assert not engine.requests
