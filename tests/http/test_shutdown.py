"""SIGTERM on the real `peftserve serve` process (tiny model, loopback): requests in flight finish, new ones and
/health get 503 meanwhile, and the process exits 0; past --drain-timeout it exits 0 anyway."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.http.conftest import MODEL_NAME

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_TOKENS = 150
STEP_DELAY_S = 0.02          # each engine step sleeps this long first: a request of MAX_TOKENS runs >= 3 s
# `peftserve serve` exactly as the console script runs it (server.cli.main), with every engine step slowed, so
# requests are surely in flight when SIGTERM arrives, however fast the machine
SLOW_CLI = ("import sys, time\n"
            "from server.engine import LLMEngine\n"
            "step = LLMEngine.step\n"
            f"LLMEngine.step = lambda self: (time.sleep({STEP_DELAY_S}), step(self))[1]\n"
            "from server.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cli_server(demo_dir):
    """Start `peftserve serve` (SLOW_CLI) on the tiny model; yields (process, base url); kills it if left."""
    processes = []

    def start(*flags):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_CLI, "serve", "--model", demo_dir, "--served-model-name", MODEL_NAME,
             "--port", str(port), "--kv-cache-memory", "1MiB", "--log-level", "info", *flags],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return process, url
            except httpx.TransportError:
                time.sleep(0.1)
        output = process.stdout.read() if process.poll() is not None else ""
        raise AssertionError(f"server did not start (exit status {process.poll()}): {output}")

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        process.stdout.close()


def body(stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL_NAME, "prompt": "drain me", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, "stream_options": {"include_usage": True} if stream else None}


def read_stream(url: str, started, max_tokens: int = MAX_TOKENS) -> dict:
    """Stream a completion; `started()` after its first event; returns its usage, whether it ended in [DONE],
    and the code of an in-band error (if any)."""
    usage, done, first, error = None, False, True, None
    with httpx.stream("POST", url + "/v1/completions", json=body(True, max_tokens), timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if first and line.startswith("data: "):
                first = False
                started()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                error = event["error"]["code"] if "error" in event else error
    return {"usage": usage, "done": done, "error": error}


def test_sigterm_finishes_requests_in_flight_and_exits_0(cli_server):
    process, url = cli_server()
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=url, timeout=120) as http:
        streaming = pool.submit(read_stream, url, lambda: process.send_signal(signal.SIGTERM))
        plain = pool.submit(http.post, "/v1/completions", json=body(False))
        deadline = time.monotonic() + 60
        while (health := http.get("/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        # draining: the requests above are still running
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        refused = http.post("/v1/completions", json=body(False))
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert not streaming.done()
        streamed, answered = streaming.result(120), plain.result(120)
    assert streamed == {"usage": {"prompt_tokens": streamed["usage"]["prompt_tokens"],
                                  "completion_tokens": MAX_TOKENS,
                                  "total_tokens": streamed["usage"]["prompt_tokens"] + MAX_TOKENS},
                        "done": True, "error": None}
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert process.wait(60) == 0
    log = process.stdout.read()
    assert "SIGTERM: draining" in log and "drained in" in log and "Traceback" not in log


def test_sigterm_past_the_drain_timeout_still_exits_0(cli_server):
    process, url = cli_server("--drain-timeout", "0.2")
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(read_stream, url, lambda: process.send_signal(signal.SIGTERM), 400)
        assert process.wait(60) == 0
        try:                                    # the stream ends early: an in-band 503, or cut
            cut = streaming.result(60)
            assert cut["usage"] is None and cut["error"] == "shutting_down", cut
        except httpx.TransportError:
            pass
    log = process.stdout.read()
    assert "drain timeout (0.2s): 1 requests still in flight are cancelled" in log
