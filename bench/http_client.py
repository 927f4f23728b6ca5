"""bench/http.py's load generator: a minimal asyncio HTTP/1.1 client (keep-alive, chunked SSE read without
per-event JSON parsing, so it takes little of the CPU the server needs on a small machine), closed and open loop."""
from __future__ import annotations

import asyncio
import json
import random
import time


class Connection:
    """One keep-alive HTTP/1.1 connection; `stream` sends a streamed completion and times its SSE events."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def stream(self, body: dict) -> dict:
        payload = json.dumps(body).encode()
        reused = self.writer is not None
        start, status = await self._send(payload)
        if status == b"" and reused:                   # the server closed the idle keep-alive connection (its
            self.close()                                # keep-alive timeout, 5 s in uvicorn): reconnect once
            self.writer = None
            start, status = await self._send(payload)
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP error: {status!r} {await self.reader.read(2000)!r}")
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass
        times, last, buf = [], b"", b""
        while True:                                     # chunked transfer encoding
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                await self.reader.readline()
                break
            data = await self.reader.readexactly(size + 2)
            now = time.perf_counter()
            buf += data[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: {") and b'"choices":[{' in event:
                    times.append(now)                   # a token's event (the usage-only event excluded)
                if event.startswith(b"data: {"):
                    last = event
        usage = json.loads(last[6:])["usage"]
        n = usage["completion_tokens"]
        return dict(start=start, end=times[-1] if times else time.perf_counter(), tokens=n,
                    ttft=(times[0] - start) if times else None,
                    tpot=(times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None)

    async def _send(self, payload: bytes) -> tuple[float, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        start = time.perf_counter()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        try:
            return start, await self.reader.readline()
        except ConnectionError:
            return start, b""

    def close(self):
        if self.writer is not None:
            self.writer.close()


def request_body(model: str, prompt: list[int], output_len: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def closed_loop(port: int, bodies: list[dict], concurrency: int) -> list[dict]:
    pending = iter(bodies)
    results = []

    async def client():
        conn = Connection(port)
        try:
            for body in pending:
                results.append(await conn.stream(body))
        finally:
            conn.close()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


async def open_loop(port: int, bodies: list[dict], rate: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    free: list[Connection] = []
    results = []

    async def one(body):
        conn = free.pop() if free else Connection(port)
        results.append(await conn.stream(body))
        free.append(conn)
    tasks = []
    for body in bodies:
        tasks.append(asyncio.ensure_future(one(body)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    for conn in free:
        conn.close()
    return results
