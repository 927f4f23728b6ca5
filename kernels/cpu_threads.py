"""Torch work off the serving thread runs on threads that end, so the process keeps one OpenMP team.

torch's CPU ops run on libgomp (the OpenMP runtime in torch's wheel), and every thread that runs a parallel op
keeps its own team of worker threads for as long as it lives. Once the process holds more OpenMP threads than
it has CPUs, libgomp stops spinning between parallel regions (its throttled spin count): the workers sleep
after every op and each of the thousands of small ops of a step pays a kernel wake-up. On the 2-core machine
(bench/omp_teams.py) a 160M decode step with 32 LoRA adapters took 107 ms on the thread that loaded the model
and 215 ms on an engine thread once the main thread had loaded it: the server's engine ran at half speed.

So the thread that steps the model should be the only long-lived thread that has run a parallel torch op.
Startup (model load, adapter preloads), adapter reads and mixture builds go through `submit` / `call`: a new
thread per call, whose team ends with it.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


def submit(fn: Callable[..., T], *args, name: str = "peftserve-once") -> Future:
    """fn(*args) on a new daemon thread that ends when it returns; a Future of its result or exception."""
    future: Future = Future()

    def body() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # delivered to whoever waits on the future
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


def call(fn: Callable[..., T], *args, name: str = "peftserve-once") -> T:
    """fn(*args) on a thread that ends when it returns; its result, or its exception re-raised here."""
    return submit(fn, *args, name=name).result()
