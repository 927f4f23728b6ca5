"""Where one decode step's time goes: the C kernel against the Python around it.

    python -m bench.step_phases [--model smollm2-135m] [--dtype bfloat16] [--seqs 1] [--prompt-len 80]
                                [--tokens 200]

`--seqs` greedy requests of `--prompt-len` random tokens decode `--tokens` tokens together; every step's parts are
timed (the engine's own methods wrapped, nothing else changed) and the medians over the decode steps printed:
  schedule     the scheduler's decision
  build_meta   the step's tensors (runner.build_meta: positions, slots, attention groups and masks), or for a
               base-model decode step its rows written into the decode stack's buffers (runner._base_decode)
  kernel       kernels/decode_layers' call (the C stack from token ids to logits and argmax, and its wrapper)
  stack python server/model/decode_stack.py around that call (the table's masks and LoRA ops; rows_logits for a
               base-model decode step)
  sampling     penalties, grammar masks, the sampler
  postprocess  detokenisation, stop checks, outputs
  step         the whole engine.step; `outside the kernel` = step - kernel
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import emit, llama_160m, machine, random_prompts


def wrap(owner, name: str, times: list[float]) -> None:
    real = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t)
    setattr(owner, name, timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama-160m"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    import server.engine as engine_module
    import server.model.decode_stack as decode_stack
    from kernels import decode_layers
    from server.config import EngineConfig
    from server.default_model import ensure_default_model
    from server.engine import LLMEngine
    from server.sampling import SamplingParams
    path = ensure_default_model() if args.model == "smollm2-135m" else str(llama_160m("float32"))
    engine = LLMEngine(EngineConfig(model=path, dtype=args.dtype, max_num_seqs=max(args.seqs, 1),
                                    kv_cache_memory="512MiB"))
    parts = {k: [] for k in ("schedule", "build_meta", "kernel", "stack", "sampling", "postprocess", "step")}
    wrap(engine.scheduler, "schedule", parts["schedule"])
    wrap(engine.runner, "build_meta", parts["build_meta"])
    wrap(engine.runner, "_base_decode", parts["build_meta"])       # a base-model decode step's rows, ...
    wrap(decode_layers, "decode_layers", parts["kernel"])
    wrap(decode_stack.DecodeStack, "logits", parts["stack"])
    wrap(decode_stack.DecodeStack, "rows_logits", parts["stack"])  # ... which include the stack's call
    wrap(engine_module, "sample_states", parts["sampling"])
    wrap(engine, "_postprocess", parts["postprocess"])
    wrap(engine, "step", parts["step"])
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.seqs, args.prompt_len, vocab=engine.vocab_size, seed=1)):
        engine.add_request(f"p{i}", prompt, params)
    per_step = []                           # each decode-only step's parts (those whose forward was the kernel)
    while engine.has_unfinished():
        before = {k: len(v) for k, v in parts.items()}
        engine.step()
        if len(parts["kernel"]) > before["kernel"]:
            step = {k: sum(v[before[k]:]) for k, v in parts.items()}
            if len(parts["build_meta"]) > before["build_meta"] and step["build_meta"] > step["stack"]:
                step["build_meta"] -= step["stack"]     # a base decode step: _base_decode ran the stack
            step["stack"] -= step["kernel"]             # the Python around the call
            step["outside"] = step["step"] - step["kernel"]
            per_step.append(step)
    decode = per_step[10:]                  # past the first steps (warm-up)
    med = {k: statistics.median(step[k] for step in decode) * 1e3 for k in decode[0]}
    row = dict(model=args.model, dtype=args.dtype, seqs=args.seqs, steps=len(decode),
               **{f"{k}_ms": v for k, v in med.items()})
    emit(row)
    print(f"\nmachine: {machine()}; {args.seqs} sequences, {args.prompt_len}-token prompts, {len(decode)} decode "
          "steps, medians\n")
    print("| model | dtype | seqs | schedule | build_meta | kernel | stack python | sampling | postprocess | step "
          "| outside the kernel |")
    print("|---" * 11 + "|")
    print(f"| {args.model} | {args.dtype} | {args.seqs} | {med['schedule']:.3f} | {med['build_meta']:.3f} | "
          f"{med['kernel']:.2f} | {med['stack']:.3f} | {med['sampling']:.3f} | {med['postprocess']:.3f} | "
          f"{med['step']:.2f} | {med['outside']:.2f} |")


if __name__ == "__main__":
    main()
