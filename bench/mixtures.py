"""What a new `merged_adapters` recipe and `peftserve merge` cost, against PEFT doing the same work.

    python -m bench.mixtures [--members 2 4] [--rank 16] [--repeats 3]

160M random Llama (bench/common.py), rank-16 all-linear LoRA adapters (bench/multi_lora.py). Points (one JSON
line each, then a table; median of --repeats):
  mixture <strategy> x<n>   ours: read the n members' checkpoints, mix (adapters/mixture.py), write the PEFT
                            checkpoint, read + fold it as the registry does (the first request's extra work; later
                            requests with the recipe pay nothing)
                            PEFT: add_weighted_adapter on a PeftModel already holding the n members (in memory, no
                            file written), then delete_adapter
  merge                     ours: adapters/merge.py merge_adapter (read base + adapter, fold, write the checkpoint)
                            PEFT: PeftModel.from_pretrained + merge_and_unload + save_pretrained
Small check run: python -m bench.mixtures --members 2 --repeats 1
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile

import torch

from bench.common import Timer, emit, llama_160m, machine
from bench.multi_lora import make_adapters

STRATEGIES = [("linear", {}), ("ties", dict(density=0.5)), ("dare_linear", dict(density=0.5)),
              ("dare_ties", dict(density=0.5)), ("cat", {}), ("svd", {})]


def time_ours_mixture(base, spec, paths, strategy, params, repeats, read) -> float:
    from adapters.mixture import MixtureRecipe, make_mixture
    recipe = MixtureRecipe(tuple(f"m{i}" for i in range(len(paths))), tuple(1.0 / len(paths) for _ in paths),
                           strategy, **params)
    seconds = []
    for _ in range(repeats):
        out = tempfile.mkdtemp(prefix="bench-mix-")
        try:
            with Timer() as t:
                make_mixture(recipe, paths, spec, f"{out}/m")
                read(f"{out}/m")
            seconds.append(t.seconds)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return statistics.median(seconds)


def time_peft_mixture(model, names, strategy, params, repeats) -> float:
    seconds = []
    for _ in range(repeats):
        with Timer() as t:
            model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "mix", combination_type=strategy,
                                       **params)
        seconds.append(t.seconds)
        model.delete_adapter("mix")
    return statistics.median(seconds)


def time_merge(base, adapter, repeats) -> tuple[float, float]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from adapters.merge import merge_adapter
    ours, peft = [], []
    for _ in range(repeats):
        out = tempfile.mkdtemp(prefix="bench-merge-")
        try:
            with Timer() as t:
                merge_adapter(str(base), adapter, f"{out}/ours")
            ours.append(t.seconds)
            with Timer() as t:
                model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
                model.merge_and_unload().save_pretrained(f"{out}/peft")
            peft.append(t.seconds)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return statistics.median(ours), statistics.median(peft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoConfig, LlamaForCausalLM

    from adapters.lora import load_lora
    from adapters.model_spec import ModelSpec
    base = llama_160m()
    spec = ModelSpec.from_hf(AutoConfig.from_pretrained(base))
    hf = LlamaForCausalLM.from_pretrained(base)

    def weight(layer, module):
        root = hf.model
        if module in ("embed_tokens", "lm_head"):
            return root.embed_tokens.weight if module == "embed_tokens" else hf.lm_head.weight
        block = root.layers[layer]
        return getattr(block.self_attn if hasattr(block.self_attn, module) else block.mlp, module).weight

    read = lambda path: load_lora(path, spec, weight)          # noqa: E731  what the registry's read does
    paths = make_adapters(base, max(args.members), args.rank)
    rows = []
    for n in args.members:
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), paths[0], adapter_name="m0")
        for i in range(1, n):
            model.load_adapter(paths[i], adapter_name=f"m{i}")
        names = [f"m{i}" for i in range(n)]
        for strategy, params in STRATEGIES:
            ours = time_ours_mixture(base, spec, paths[:n], strategy, params, args.repeats, read)
            torch.manual_seed(0)
            peft = time_peft_mixture(model, names, strategy, params, args.repeats)
            record = dict(point=f"mixture {strategy} x{n}", ours_s=round(ours, 3), peft_s=round(peft, 3))
            emit(record)
            rows.append(record)
    ours, peft = time_merge(base, paths[0], args.repeats)
    record = dict(point="merge", ours_s=round(ours, 3), peft_s=round(peft, 3))
    emit(record)
    rows.append(record)
    print(f"\n{machine()}, 160M Llama fp32, rank-{args.rank} all-linear adapters, median of {args.repeats}\n")
    print("| point | ours (s) | PEFT (s) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['point']} | {r['ours_s']} | {r['peft_s']} |")


if __name__ == "__main__":
    main()
