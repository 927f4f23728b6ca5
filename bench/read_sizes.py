"""Read bandwidth against the size of what is read again and again: where the caches end and memory begins.

    python -m bench.read_sizes [--sizes-mb 1024 512 256 128 64 32 8] [--rounds 2]

A reduction (torch's sum, the process's threads) over an fp32 buffer on transparent huge pages, as
bench/step_floor.py's read_bandwidth, repeated over the same buffer: per size the best and the median GB/s. A
buffer the last-level cache keeps between passes reads at the cache's speed; one larger than what it keeps reads
at memory speed. A decode step at one request reads every weight once per token in the same order, so this says
whether a model's weights (bench/step_floor.py: SmolLM2-135M bf16 269 MB, fp32 538 MB of linear weights) could
be read from a cache instead of memory on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import emit, machine
from server.model.weight_arena import huge_page_buffer


def read_speed(mb: int) -> tuple[float, float]:
    """(best, median) bytes per second of a sum over `mb` MiB, warmed up by two passes."""
    x = huge_page_buffer(mb * 2**20)[1].view(torch.float32).fill_(1.0)
    x.sum()
    x.sum()
    times = []
    for _ in range(max(5, 2000 // mb)):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    nbytes = x.numel() * 4
    return nbytes / min(times), nbytes / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", nargs="+", type=int, default=[1024, 512, 256, 128, 64, 32, 8])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        for mb in args.sizes_mb:
            best, median = read_speed(mb)
            row = dict(round=r, mb=mb, best_gb_s=best / 1e9, median_gb_s=median / 1e9)
            emit(row)
            rows.append(row)
    print(f"\nmachine: {machine()}; {torch.get_num_threads()} threads; sums over fp32 buffers on huge pages\n")
    print("| MiB read again and again | " + " | ".join(f"round {r}: best / median GB/s" for r in range(args.rounds))
          + " |")
    print("|---|" + "---|" * args.rounds)
    for mb in args.sizes_mb:
        cells = [f"{x['best_gb_s']:.1f} / {x['median_gb_s']:.1f}" for x in rows if x["mb"] == mb]
        print(f"| {mb} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
