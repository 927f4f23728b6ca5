"""bench/http.py --turns: every case's closed loop over HTTP and offline in turns, each ratio taken within a round."""
from __future__ import annotations

import asyncio
import statistics

from bench.common import emit
from bench.http import case_names, run_offline, summarise
from bench.http_client import closed_loop, request_body


def in_turns(port: int, engine, model: str, prompts, output_len: int, args) -> dict:
    """--turns rounds of every case's closed loop, over HTTP and offline (this process's engine, the server idle)
    one after the other, the order of cases and of HTTP / offline rotating each round: every ratio is taken
    within a round, so the machine's drift (20-50% within minutes here) falls on both of its sides."""
    tok_s: dict[tuple[str, str], list[float]] = {}
    for r in range(args.turns):
        cases = args.cases[r % len(args.cases):] + args.cases[:r % len(args.cases)]
        for case in cases:
            names = case_names(case, args.requests, model)
            bodies = [request_body(n, p, output_len) for n, p in zip(names, prompts)]
            for where in (("http", "offline") if r % 2 == 0 else ("offline", "http")):
                if where == "http":
                    got = summarise(asyncio.run(closed_loop(port, bodies, args.concurrency)))["tok_s"]
                else:
                    got = run_offline(engine, prompts, names, model, output_len)[0]
                tok_s.setdefault((case, where), []).append(got)
    row = dict(model=model, mode=f"closed {args.concurrency}, {args.turns} rounds in turns", tok_s=tok_s)
    emit({**row, "tok_s": {f"{c} {w}": v for (c, w), v in tok_s.items()}})
    return row


def print_turns(row: dict) -> None:
    tok_s = row["tok_s"]
    cases = list(dict.fromkeys(c for c, _ in tok_s))

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f} - {max(xs):.2f})"
    print(f"\n{row['model']}, {row['mode']}: tok/s median over rounds, ratios per round: median (min - max)\n")
    print("| case | HTTP tok/s | offline tok/s | HTTP / offline | / base, HTTP | / base, offline |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        http_, off = tok_s[(case, "http")], tok_s[(case, "offline")]
        cells = [spread([h / o for h, o in zip(http_, off)])]
        for where, mine in (("http", http_), ("offline", off)):
            base = tok_s.get(("base", where))
            cells.append(spread([m / b for m, b in zip(mine, base)]) if base and case != "base" else "")
        print(f"| {case} | {statistics.median(http_):.0f} | {statistics.median(off):.0f} | " + " | ".join(cells) + " |")
