"""Several prompts and samples as one response's choices.

A request with P prompts and n samples each (best_of generated) runs as P engine requests; `fan_in` merges their
outputs into one stream whose `index` is the OpenAI choice index `prompt_index * samples + sample_index`.
`keep_best` then keeps, per prompt, the n of best_of samples with the highest cumulative logprob (as vLLM does)
and renumbers them `prompt_index * n + rank`.
"""
from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import replace
from typing import AsyncIterator

from server.outputs import RequestOutput

_DONE = object()


async def fan_in(generations: list[AsyncIterator[RequestOutput]], samples: int) -> AsyncIterator[RequestOutput]:
    """One stream of the outputs of `generations` (request p's sample s -> index p * samples + s).

    Every request's first output is awaited before anything is yielded, so a request the engine rejects (prompt
    too long, overload) fails the whole call before a stream starts, and the others are aborted. Closing the
    stream early aborts every request."""
    firsts = await asyncio.gather(*(anext(g) for g in generations), return_exceptions=True)
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        for g in generations:
            await g.aclose()
        raise errors[0]
    if len(generations) == 1:
        yield firsts[0]
        async for out in generations[0]:
            yield out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                queue.put_nowait(out)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    pumps = [asyncio.ensure_future(pump(g)) for g in generations]
    try:
        for p, first in enumerate(firsts):
            yield _renumber(first, p, samples)
        prompt_of = {first.request_id: p for p, first in enumerate(firsts)}
        num_open = len(generations)
        while num_open:
            item = await queue.get()
            if item is _DONE:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield _renumber(item, prompt_of[item.request_id], samples)
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with suppress(BaseException):
                await task
        for g in generations:
            await g.aclose()


def _renumber(out: RequestOutput, prompt_index: int, samples: int) -> RequestOutput:
    return out if prompt_index == 0 else replace(out, index=prompt_index * samples + out.index)


def keep_best(outputs: list[RequestOutput], n: int, best_of: int) -> list[RequestOutput]:
    """The outputs of the n samples per prompt (of best_of, choice index p * best_of + s) with the highest final
    cumulative logprob, renumbered p * n + rank (best first)."""
    if best_of == n:
        return outputs
    final = {out.index: out.cumulative_logprob for out in outputs if out.finished}
    new_index: dict[int, int] = {}
    for p in range(max(final) // best_of + 1):
        ranked = sorted(range(p * best_of, (p + 1) * best_of), key=lambda i: -final[i])
        new_index.update({i: p * n + rank for rank, i in enumerate(ranked[:n])})
    return [replace(out, index=new_index[out.index]) for out in outputs if out.index in new_index]
