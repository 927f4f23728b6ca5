"""Decode steps of an unchanged batch reuse the LoRA step view and its decode-kernel ops (adapters/lora_runtime.py),
and an adapter installed or removed between two such steps (its stacks re-allocated) still takes effect: every
kernel call's ops point at the live stacks and the requests' outputs equal PEFT's."""
from __future__ import annotations

from peft import LoraConfig

import server.model.decode_stack as decode_stack
from tests.peft_fixtures import load_peft, save_adapter
from tests.test_lora_vs_peft import BASE, engine_with, peft_reference, run_with_adapters
from tests.test_model_vs_hf import make_prompts


def test_decode_steps_reuse_their_ops_across_adapter_churn(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    base = tiny_model_dir("llama")
    config = dict(target_modules="all-linear", init_lora_weights=False)
    dirs = {name: save_adapter(base, LoraConfig(r=r, **config), tmp_path / name, seed=seed)
            for name, r, seed in (("a", 8, 1), ("b", 4, 2), ("c", 8, 3))}
    engine = engine_with(base, {k: dirs[k] for k in ("a", "b")})
    lora = next(rt for rt in engine.runtimes if rt.name == "lora")

    def live_stacks() -> set[int]:
        return {bucket.a.data_ptr() for linear in lora.by_linear.values() for bucket in linear.buckets.values()}

    kernel_ops, real_kernel = [], decode_stack.dl.decode_layers

    def spy_kernel(h, ptrs, ops, *args, **kwargs):
        if ops is not None:
            kernel_ops.append(set(ops[:, 0].tolist()) <= live_stacks())
        return real_kernel(h, ptrs, ops, *args, **kwargs)
    monkeypatch.setattr(decode_stack.dl, "decode_layers", spy_kernel)

    views, real_view = [], lora.step_view

    def spy_view(layout):
        views.append(real_view(layout))
        return views[-1]
    monkeypatch.setattr(lora, "step_view", spy_view)

    built, real_build = [], type(lora.by_linear[next(iter(lora.by_linear))])._native_ops

    def spy_build(self, seg, linear):
        built.append(len(views))
        return real_build(self, seg, linear)
    monkeypatch.setattr(type(lora.by_linear[next(iter(lora.by_linear))]), "_native_ops", spy_build)

    real_step, steps = engine.step, []

    def step():
        steps.append(len(steps))
        if len(steps) == 5:                   # mid-decode: c installed into the next slot (the stacks grow)
            engine.adapters.load("c", str(dirs["c"]))
        if len(steps) == 7:                   # and removed again (its slot zeroed in place)
            engine.adapters.unload("c")
        return real_step()
    engine.step = step

    prompts = make_prompts(5, [4, 9, 6])
    names = ["a", "b", BASE]
    tokens, logits = run_with_adapters(engine, prompts, names, [0, 0, 0])

    assert len(kernel_ops) >= 6 and all(kernel_ops)        # decode steps ran the kernel, on the live stacks
    decode_views = views[1:]                                 # step 0 prefills
    assert len({id(v) for v in decode_views}) == 1           # one batch, one view, every decode step
    num_linears = sum(1 for linear in lora.by_linear.values() if linear.buckets)     # lm_head has none
    # the ops were built at the first decode step and again after each install / removal, not every step
    assert len(built) == 3 * num_linears and len(set(built)) == 3
    peft_model = load_peft(base, {k: dirs[k] for k in ("a", "b")})
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        ref_tokens, ref_logits = peft_reference(peft_model, prompt, name)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0)
