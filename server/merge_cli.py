"""`peftserve merge` (fold an adapter or a LoRA mixture into the base, write an HF checkpoint) and what
`peftserve serve --merge NAME` does at startup (serve one adapter merged, single tenant)."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from dataclasses import replace

from adapters.mixture import SIGN_METHODS, STRATEGIES, MixtureError, MixtureRecipe

log = logging.getLogger("peftserve")


def add_merge_command(commands) -> argparse.ArgumentParser:
    merge = commands.add_parser(
        "merge", help="fold an adapter (or a mixture of LoRA adapters) into the base model; write an HF checkpoint",
        description="Fold a LoRA / rsLoRA / DoRA / AdaLoRA / (IA)^3 adapter, or a mixture of LoRA adapters (several "
                    "--adapter), into the base model and write an ordinary Hugging Face checkpoint to --out "
                    "(config, tokenizer files and the merged safetensors): what PEFT's merge_and_unload gives.")
    merge.add_argument("--model", required=True, help="HF model directory of the base")
    merge.add_argument("--adapter", action="append", required=True, metavar="PATH",
                       help="PEFT adapter directory; repeat it to merge a mixture of LoRA adapters")
    merge.add_argument("--out", required=True, metavar="DIR", help="new directory for the merged checkpoint")
    mix = merge.add_argument_group("mixture (with several --adapter; the fields of a request's merged_adapters)")
    mix.add_argument("--weights", type=float, nargs="+", metavar="W", help="one per --adapter (default: all 1)")
    mix.add_argument("--merge-strategy", choices=STRATEGIES, default="linear", help="PEFT combination type")
    mix.add_argument("--density", type=float, help="fraction kept (ties / dare / prune strategies)")
    mix.add_argument("--majority-sign-method", choices=SIGN_METHODS, default="total")
    mix.add_argument("--seed", type=int, default=0, help="DARE's random masks")
    mix.add_argument("--svd-rank", type=int, help="rank of *svd results (default: the largest member rank)")
    return merge


def run_merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from adapters.merge import MergeError, merge_adapter, merge_mixture
    mixture = len(args.adapter) > 1 or args.weights is not None
    try:
        if mixture:
            weights = args.weights if args.weights is not None else [1.0] * len(args.adapter)
            recipe = MixtureRecipe(tuple(args.adapter), tuple(weights), args.merge_strategy, args.density,
                                   args.majority_sign_method, args.seed, args.svd_rank)
            merge_mixture(args.model, recipe, list(args.adapter), args.out)
        else:
            merge_adapter(args.model, args.adapter[0], args.out)
    except MixtureError as exc:
        parser.error(str(exc).replace("merged_adapters.", "--").replace("merged_adapters", "mixture"))
    except (MergeError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    log.info("wrote %s", args.out)
    return 0


def merged_serving(config, adapters: dict, name: str):
    """For `serve --merge NAME`: (engine config whose model is a temporary directory holding the base with
    adapter NAME folded in, the directory). `adapters`: name -> (path, adapter_drop), NAME among them."""
    from adapters.merge import merge_adapter
    if name not in adapters:
        raise ValueError(f"--merge {name}: no adapter of that name (give --adapter {name}=PATH)")
    path, drop = adapters[name]
    if drop:
        raise ValueError(f"--merge {name}: adapter_drop={drop} cannot be merged (it skips layers per request)")
    out = tempfile.mkdtemp(prefix="peftserve-merged-")
    try:
        log.info("merging adapter %r (%s) into %s", name, path, config.model)
        merge_adapter(config.model, path, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return replace(config, model=out), out


def check_merge_option(parser, merge: str | None, adapters: dict, pinned: list, default_model: bool) -> None:
    """serve --merge NAME: NAME is an --adapter (or, with the default model, a demo adapter), and the only one."""
    if merge is None:
        return
    if merge not in adapters and not default_model:
        parser.error(f"--merge {merge}: no --adapter {merge}=PATH to merge")
    others = sorted(set(adapters) - {merge})
    if others:
        parser.error(f"--merge {merge} serves that one adapter merged into the base; drop --adapter "
                     f"{', '.join(others)}")
    if pinned:
        parser.error("--pin has no effect with --merge (the adapter is part of the base)")


def cleanup(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
