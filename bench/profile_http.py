"""Where a whole HTTP run spends the server's CPU: py-spy samples of the `peftserve serve` process (every thread)
during bench/http.py's closed loop; prints samples per thread and the top functions (inclusive and self).

    python -m bench.profile_http [--model llama-160m] [--case lora8] [--requests 64] [--concurrency 32]
                                 [--dtype float32] [--py-spy PATH]

py-spy is a development tool, not a dependency: `pip install --target /tmp/pyspy py-spy==0.4.3` and pass
--py-spy /tmp/pyspy/bin/py-spy. Samples are taken only while a thread runs (idle threads are not sampled).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import time

from bench import http


def analyse(path: str, top: int) -> None:
    per_thread, inclusive, own = collections.Counter(), collections.Counter(), collections.Counter()
    for line in open(path).read().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread, n = frames[0].split(": ")[-1], int(count)
        per_thread[thread] += n
        seen = set()
        for frame in frames[1:]:
            name = frame.split(" (")[0] + " " + frame.split("/")[-1].rstrip(")")
            if name not in seen:
                inclusive[(thread, name)] += n
                seen.add(name)
        own[(thread, frames[-1].split(" (")[0] + " " + frames[-1].split("/")[-1].rstrip(")"))] += n
    print("samples per thread:", dict(per_thread.most_common()))
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}:")
        for (thread, name), n in counter.most_common(top):
            print(f"{n:6d} {n / sum(per_thread.values()):6.1%}  {thread:18s} {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-160m")
    ap.add_argument("--case", default="lora8")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--py-spy", default="/tmp/pyspy/bin/py-spy")
    ap.add_argument("--out", default="/tmp/peftserve-http-profile.txt")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    args.max_num_seqs, args.kv_cache_memory = 64, "1GiB"
    base = http.model_dir(args.model)
    dirs = http.make_adapters(base, args.model, 64)
    prompt_len, output_len = (32, 32) if args.model == "llama-160m" else (80, 64)
    prompts = http.prompts_for(args.model, base, args.requests, prompt_len)
    names = http.case_names(args.case, args.requests, args.model)
    bodies = [http.request_body(n, p, output_len) for n, p in zip(names, prompts)]
    child, port = http.start_server(base, args.model, dirs, args, [])
    try:
        asyncio.run(http.closed_loop(port, bodies[:8], 8))                       # warm up
        spy = subprocess.Popen([args.py_spy, "record", "-p", str(child.pid), "--format", "raw", "-o", args.out,
                                "--threads", "-r", "200", "--nonblocking"])
        time.sleep(1)
        print(http.summarise(asyncio.run(http.closed_loop(port, bodies, args.concurrency))))
        spy.send_signal(2)
        spy.wait()
    finally:
        http.stop_server(child)
    analyse(args.out, args.top)


if __name__ == "__main__":
    main()
