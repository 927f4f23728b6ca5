"""`peftserve serve`: flag parsing, and the real command serving HTTP."""
import os
import subprocess
import sys

import httpx
import pytest

from server.cli import main, parse_serve_options
from tests.http.conftest import ServerThread

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as caught:
        parse_serve_options(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_defaults_serve_the_demo_model(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    options = parse_serve_options(["serve"])
    assert options.is_demo and options.engine.model == str(tmp_path / "demo-llama")
    assert options.engine.served_model_name == "demo-llama"
    assert (options.host, options.port, options.api_key, options.adapters) == ("127.0.0.1", 8000, None, {})
    assert not (tmp_path / "demo-llama").exists()       # parsing builds nothing


def test_all_flags(demo_dir):
    options = parse_serve_options([
        "serve", "--model", demo_dir, "--host", "0.0.0.0", "--port", "9000", "--dtype", "bfloat16",
        "--served-model-name", "base", "--kv-cache-memory", "512MiB", "--max-num-seqs", "8",
        "--max-model-len", "256", "--adapter", "a=/ckpt/a", "--adapter", "b=/ckpt/b=2,adapter_drop=3", "--api-key", "k"])
    engine = options.engine
    assert (engine.model, engine.served_model_name, engine.dtype) == (demo_dir, "base", "bfloat16")
    assert (engine.kv_cache_bytes, engine.max_num_seqs, engine.max_model_len) == (512 * 2**20, 8, 256)
    assert options.adapters == {"a": ("/ckpt/a", 0), "b": ("/ckpt/b=2", 3)}
    assert (options.host, options.port, options.api_key, options.is_demo) == ("0.0.0.0", 9000, "k", False)


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--port", "70000"], "port must be <= 65535"),
    (["serve", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["serve", "--max-num-seqs", "0"], "positive integer"),
    (["serve", "--kv-cache-memory", "lots"], "cannot parse memory size 'lots'"),
    (["serve", "--adapter", "no-path"], "expected NAME=PATH"),
    (["serve", "--adapter", "a=/x", "--adapter", "a=/y"], "--adapter a is given twice"),
    (["serve", "--model", "/no/such/dir"], "not a Hugging Face model directory"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus"),
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
    """`uvicorn.run` replaced by a recorder, so main() can be driven in-process."""
    import uvicorn
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    return calls


def test_main_builds_and_serves_the_app(demo_dir, captured_uvicorn):
    argv = ["serve", "--model", demo_dir, "--port", "8123", "--kv-cache-memory", "1MiB",
            "--served-model-name", "tiny", "--api-key", "k", "--log-level", "warning"]
    assert main(argv) == 0
    [(app, kwargs)] = captured_uvicorn
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "log_level": "warning"}
    thread = ServerThread(app).start()          # serve what main() built, on a free port
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 3, "ignore_eos": True}
        assert httpx.post(thread.url + "/v1/completions", json=body).status_code == 401
        response = httpx.post(thread.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(thread.url + "/health").status_code == 200
    finally:
        thread.stop()


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
