"""kernels/cpu_threads.py: torch work off the serving thread leaves no OpenMP team behind (so libgomp keeps
spinning between the engine's parallel ops). Each check runs in a fresh interpreter with two OpenMP threads
(OMP_NUM_THREADS=2), so that no earlier test's thread already owns a team, and counts the process's OS threads in /proc/self/task: an
OpenMP worker is an OS thread that `threading` does not know of."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")

PRELUDE = """
import os, sys, threading, time
import torch

def native_threads():
    '''OS threads of this process that are not Python threads: OpenMP workers (and any other native pool).'''
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())

def parallel_op():
    torch.ones(1 << 22).mul_(2)          # far above ATen's grain size: runs on the OpenMP team

def settle(expected, timeout=10.0):
    '''native_threads() once it equals `expected` (a team's workers exit shortly after their master).'''
    end = time.monotonic() + timeout
    while native_threads() != expected and time.monotonic() < end:
        time.sleep(0.02)
    return native_threads()
"""


def run(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_call_leaves_no_openmp_workers_and_a_live_thread_would():
    out = run("""
        from kernels import cpu_threads
        base = native_threads()
        assert cpu_threads.call(lambda: parallel_op() or 7) == 7
        after_call = settle(base)
        # the contrast: the same op on a thread that stays alive keeps that thread's team (one worker)
        stop = threading.Event()
        ran = threading.Event()
        keeper = threading.Thread(target=lambda: (parallel_op(), ran.set(), stop.wait()))
        keeper.start()
        ran.wait()
        with_keeper = settle(base + 1)
        stop.set()
        keeper.join()
        print(base, after_call, with_keeper)
    """)
    base, after_call, with_keeper = map(int, out.split())
    assert after_call == base
    assert with_keeper == base + 1


def test_importing_the_server_runs_no_parallel_op():
    """An import-time torch op over a big tensor (an NF4 lookup table was one) would give the importing thread,
    the main thread, a team for good."""
    out = run("""
        base = native_threads()
        import server.cli, server.api, server.engine, kernels.nf4, adapters.registry
        after_imports = native_threads()
        parallel_op()                       # the contrast: a parallel op on the main thread does leave a worker
        print(base, after_imports, settle(base + 1))
    """)
    base, after_imports, after_op = map(int, out.split())
    assert after_imports == base
    assert after_op == base + 1


def test_a_call_reraises_and_submit_gives_a_future():
    out = run("""
        from kernels import cpu_threads
        try:
            cpu_threads.call(lambda: 1 / 0)
        except ZeroDivisionError:
            print("raised")
        fut = cpu_threads.submit(lambda a, b: a + b, 2, 3, name="adder")
        print(fut.result(timeout=10))
    """)
    assert out.split() == ["raised", "5"]


def test_serve_startup_leaves_the_main_thread_without_an_openmp_team(tiny_model_dir, tmp_path):
    """Startup's torch work (here: a parallel op added to the engine's construction, as a model load does)
    runs on a thread that ends, so when uvicorn would start the process holds no OpenMP worker; the engine
    thread started afterwards is then the only team. And the startup heap is frozen out of the cyclic collector."""
    from peft import LoraConfig

    from tests.peft_fixtures import save_adapter
    base = tiny_model_dir("llama")
    adapter = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "adapter", seed=3)
    out = run(f"""
        from server import cli
        from server.engine import LLMEngine
        init = LLMEngine.__init__
        def heavy_init(self, config):
            init(self, config)
            parallel_op()
        LLMEngine.__init__ = heavy_init
        base = native_threads()
        seen = {{}}
        def fake_run_server(app, **kwargs):
            import gc
            seen["native"] = settle(base)
            seen["frozen"] = gc.get_freeze_count()
            engine = app.state.mixtures.async_engine.engine
            seen["adapters"] = engine.adapters.names()
        cli.run_server = fake_run_server
        cli.serve(cli.parse_serve_options(["serve", "--model", {str(base)!r}, "--adapter", "a={adapter}",
                                           "--dtype", "float32", "--kv-cache-memory", "8MiB"], {{}}))
        print(base, seen["native"], ",".join(seen["adapters"]), seen["frozen"])
    """)
    base_count, at_serve, names, frozen = out.split()
    assert int(at_serve) == int(base_count)
    assert names == "a"
    assert int(frozen) > 10_000            # the startup heap is frozen before serving (server/cli.py)


def test_adapter_reads_run_on_threads_that_end(tmp_path):
    """The registry's loader threads (adapters/reader.py) end with their read, team and all, and a read's error
    still reaches its future."""
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    out = run(f"""
        from adapters.config import AdapterError
        from adapters.reader import CheckpointReader
        class Weights:
            num_bytes = 8
        def loader(path):
            parallel_op()                   # as folding a real adapter's tensors does
            return Weights()
        base = native_threads()
        reader = CheckpointReader({{"lora": loader}}, num_threads=2)
        loaded = [f.result(timeout=30) for f in [reader.submit({str(tmp_path)!r}) for _ in range(3)]]
        failed = reader.submit("/nonexistent/adapter").exception(timeout=30)
        print(base, settle(base), loaded[0].kind, type(failed).__name__)
    """)
    base, after, kind, error = out.split()
    assert int(after) == int(base) and kind == "lora" and error == "AdapterError"
