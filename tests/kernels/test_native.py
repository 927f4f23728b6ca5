"""kernels/native.py: C kernels are built once into the cache and loaded; without a working compiler the
server still serves, on the torch paths, with the same outputs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(script: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_build_is_cached_by_source_and_reused(tmp_path):
    out = run("""
        import os
        from kernels import native
        lib = native.load("paged_decode")
        root = os.path.join(os.environ["PEFTSERVE_CACHE"], "kernels")
        print(lib is not None, sorted(n for n in os.listdir(root) if not n.startswith(".")))
    """, PEFTSERVE_CACHE=str(tmp_path))
    ok, files = out.split(" ", 1)
    assert ok == "True" and files.startswith("['paged_decode-") and files.count(".so") == 1
    built = next((tmp_path / "kernels").iterdir())
    mtime = built.stat().st_mtime_ns
    run("from kernels import native; assert native.load('paged_decode') is not None",
        PEFTSERVE_CACHE=str(tmp_path))
    assert built.stat().st_mtime_ns == mtime                  # loaded from the cache, not rebuilt


def test_without_a_compiler_the_torch_paths_give_the_same_tokens(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    script = f"""
        from kernels import lora_fused, paged_decode, skinny_gemm
        from server.config import EngineConfig
        from server.engine import LLMEngine
        from server.sampling import SamplingParams
        engine = LLMEngine(EngineConfig(model={str(path)!r}, dtype="float32", kv_cache_memory="8MiB", block_size=4))
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate([[5, 9, 13], [7, 3, 2, 11, 4, 8, 6]]):
            engine.add_request(str(i), prompt, params)
        tokens = {{"0": [], "1": []}}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.token_ids)
        print(paged_decode.available(), lora_fused.available(), skinny_gemm.available(), tokens["0"], tokens["1"])
    """
    with_kernels = run(script, PEFTSERVE_CACHE=str(tmp_path / "a"))
    without = run(script, PEFTSERVE_CACHE=str(tmp_path / "b"), CC="false")
    assert with_kernels.startswith("True True True ")
    assert without.startswith("False False False ")
    assert with_kernels.split(" ", 3)[3] == without.split(" ", 3)[3]
    assert not (tmp_path / "b" / "kernels").exists() or not any((tmp_path / "b" / "kernels").iterdir())



def test_the_phase_timed_build_counts_every_phase_and_computes_the_same(tiny_model_dir, tmp_path):
    """bench/decode_phases.py's build (-DPHASE_TIMES): its phase list matches the kernel's, its decode steps give
    the default build's tokens, and the matmul and attention phases are timed."""
    import re
    from bench.decode_phases import PHASES
    source = open(os.path.join(REPO, "kernels", "decode_layers.c")).read()
    enum = re.search(r"enum \{ (PH_EMBED.*?) \};", source, re.S).group(1)
    assert [n.strip() for n in enum.split(",")][-1] == "PH_COUNT"
    assert len([n for n in enum.split(",") if n.strip()]) - 1 == len(PHASES)
    script = f"""
        import ctypes, sys
        from kernels import native
        timed = sys.argv[1] == "timed"
        if timed:
            native.FLAGS = native.FLAGS + ("-DPHASE_TIMES",)
        from server.config import EngineConfig
        from server.engine import LLMEngine
        from server.sampling import SamplingParams
        engine = LLMEngine(EngineConfig(model={str(tiny_model_dir("llama"))!r}, kv_cache_memory="4MiB", block_size=4))
        engine.add_request("a", [5, 9, 33, 7, 100, 21], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        tokens = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.token_ids]
        print(tokens)
        if timed:
            seconds = (ctypes.c_double * {len(PHASES)}).in_dll(native.load("decode_layers"), "phase_seconds")
            print([seconds[i] > 0 for i in range({len(PHASES)})])
    """
    default = run(script.replace("sys.argv[1]", "'default'"), PEFTSERVE_CACHE=str(tmp_path)).split("\n")
    timed = run(script.replace("sys.argv[1]", "'timed'"), PEFTSERVE_CACHE=str(tmp_path)).split("\n")
    assert timed[0] == default[0] and len(eval(default[0])) == 6
    counted = dict(zip(PHASES, eval(timed[1])))
    assert all(counted[p] for p in ("qkv", "attention items", "attention merge", "o", "gate_up", "down", "lm_head"))
