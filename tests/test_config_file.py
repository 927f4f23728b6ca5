"""`peftserve serve` options from flags, PEFTSERVE_* variables and a --config YAML file: precedence flag > env >
file > default, per option; repeatable options come whole from one source; bad values name their source."""
from __future__ import annotations

import pytest

from server.cli import build_parser, parse_serve_options


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")         # parsing only checks that it is there
    return str(tmp_path / "base")


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "peftserve.yaml"
    path.write_text(text)
    return str(path)


def parse(argv, environ=None):
    return parse_serve_options(["serve", *argv], environ={} if environ is None else environ)


def parse_error(capsys, argv, environ=None) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(argv, environ)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_precedence_flag_over_env_over_file_over_default(tmp_path, model_dir):
    config = write_config(tmp_path, f"""
model: {model_dir}
port: 7001                  # file only
max-num-seqs: 5             # file and env
kv_cache_memory: 64MiB      # file, env and flag (underscores work too)
api-key: from-file
no-demo-adapters: true
""")
    environ = {"PEFTSERVE_MAX_NUM_SEQS": "6", "PEFTSERVE_KV_CACHE_MEMORY": "32MiB", "PEFTSERVE_HOST": "0.0.0.0",
               "PEFTSERVE_CACHE": "/not/a/flag"}
    options = parse(["--config", config, "--kv-cache-memory", "16MiB"], environ)
    assert options.port == 7001                                   # file
    assert options.engine.max_num_seqs == 6                      # env over file
    assert options.engine.kv_cache_bytes == 16 * 2**20            # flag over env and file
    assert options.host == "0.0.0.0"                              # env
    assert options.api_key == "from-file" and not options.demo_adapters
    assert options.engine.max_waiting == 1024                     # default
    assert options.engine.model == model_dir


def test_config_from_env_and_switches(tmp_path, model_dir):
    config = write_config(tmp_path, "no-demo-adapters: true\ndrain-timeout: 2.5\n")
    options = parse(["--model", model_dir], {"PEFTSERVE_CONFIG": config, "PEFTSERVE_NO_DEMO_ADAPTERS": "false"})
    assert options.demo_adapters                                  # env false beats file true
    assert options.drain_timeout == 2.5
    assert not parse(["--no-demo-adapters"], {"PEFTSERVE_NO_DEMO_ADAPTERS": "0"}).demo_adapters


def test_repeatable_options_come_from_one_source(tmp_path, model_dir):
    root = tmp_path / "adapters"
    root.mkdir()
    config = write_config(tmp_path, f"""
adapter:
  - a=/ckpt/a
  - b=/ckpt/b,adapter_drop=2
adapter-dir: [{root}]
pin: [a]
""")
    options = parse(["--model", model_dir, "--config", config])
    assert options.adapters == {"a": ("/ckpt/a", 0), "b": ("/ckpt/b", 2)}
    assert (options.adapter_dirs, options.pinned) == ([str(root)], ["a"])
    # env replaces the file's list (not merged); values split like a shell line
    options = parse(["--model", model_dir, "--config", config],
                    {"PEFTSERVE_ADAPTER": "c=/ckpt/c 'd=/ckpt/my adapter'", "PEFTSERVE_PIN": "c"})
    assert options.adapters == {"c": ("/ckpt/c", 0), "d": ("/ckpt/my adapter", 0)} and options.pinned == ["c"]
    # a flag replaces both
    options = parse(["--model", model_dir, "--config", config, "--adapter", "e=/ckpt/e"],
                    {"PEFTSERVE_ADAPTER": "c=/ckpt/c", "PEFTSERVE_PIN": ""})
    assert options.adapters == {"e": ("/ckpt/e", 0)} and options.pinned == []


@pytest.mark.parametrize("config, environ, message", [
    ("port: http\n", {}, "--config {path}: port=http: --port: expected a positive integer, got 'http'"),
    ("kv-cache: 1GiB\n", {}, "--config {path}: unknown option 'kv-cache' (did you mean 'kv-cache-memory'?)"),
    ("- port\n", {}, "--config {path}: expected a mapping of option: value, got list"),
    ("port: [1, 2]\n", {}, "--config {path}: port: --port takes one value, got [1, 2]"),
    ("port: 8000\n  bad: indent\n", {}, "--config {path}: not valid YAML"),
    ("dtype: int8\n", {}, "--config {path}: dtype=int8: --dtype: expected one of auto, float32, bfloat16, float16"),
    ("", {"PEFTSERVE_PORT": "70000"}, "PEFTSERVE_PORT=70000: --port: port must be <= 65535"),
    ("", {"PEFTSERVE_NO_DEMO_ADAPTERS": "maybe"}, "PEFTSERVE_NO_DEMO_ADAPTERS=maybe: expected true or false"),
    ("", {"PEFTSERVE_KV_CACHE_MEMORY": "lots"}, "cannot parse memory size 'lots'"),
])
def test_bad_values_name_their_source(tmp_path, capsys, config, environ, message):
    path = write_config(tmp_path, config)
    err = parse_error(capsys, ["--config", path], environ)
    assert message.format(path=path) in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    err = parse_error(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert f"--config {tmp_path / 'nope.yaml'}: cannot read it (No such file or directory)" in err


def test_flag_errors_are_still_reported_as_flags(capsys):
    assert "argument --port: expected a positive integer, got 'x'" in parse_error(capsys, ["--port", "x"])


def test_help_is_grouped_and_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit) as caught:
        parse(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    positions = [out.index(f"\n{group}:\n") for group in ("model", "adapters", "memory", "server", "security")]
    assert positions == sorted(positions)
    assert out.index("\n  --model") < positions[1] < out.index("\n  --adapter-dir") < positions[2]
    assert positions[4] < out.index("\n  --api-key")
    assert "(default: 2GiB)" in out and "SUPPRESS" not in out and "(default: None)" not in out
    assert "Precedence: flag > env > file" in out


def test_every_flag_has_an_env_form(tmp_path, model_dir):
    """Each option of `serve`, set only through its PEFTSERVE_* variable, reaches the parsed options."""
    (tmp_path / "ad").mkdir()
    cases = {   # env value, what it must set
        "model": (model_dir, lambda o: o.engine.model == model_dir),
        "served_model_name": ("m", lambda o: o.engine.served_model_name == "m"),
        "dtype": ("bfloat16", lambda o: o.engine.dtype == "bfloat16"),
        "quantize": ("nf4", lambda o: o.engine.quantize == "nf4" and not o.engine.double_quant),
        "double_quant": ({"PEFTSERVE_QUANTIZE": "nf4", "PEFTSERVE_DOUBLE_QUANT": "yes"},   # with quantize
                         lambda o: o.engine.quantize == "nf4" and o.engine.double_quant),
        "max_model_len": ("99", lambda o: o.engine.max_model_len == 99),
        "no_demo_adapters": ("yes", lambda o: not o.demo_adapters),
        "adapter": ("x=/p", lambda o: o.adapters == {"x": ("/p", 0)}),
        "pin": (None, lambda o: o.pinned == ["x"]),                 # with adapter
        "merge": ("default-model-demo", lambda o: o.merge == "default-model-demo"),   # without --model: a demo name
        "adapter_dir": (str(tmp_path / "ad"), lambda o: o.adapter_dirs == [str(tmp_path / "ad")]),
        "max_loras": ("3", lambda o: o.engine.max_loras == 3),
        "kv_cache_memory": ("3MiB", lambda o: o.engine.kv_cache_bytes == 3 * 2**20),
        "max_adapter_memory": ("5MiB", lambda o: o.engine.max_adapter_bytes == 5 * 2**20),
        "max_host_adapter_memory": ("0", lambda o: o.engine.max_host_adapter_bytes == 0),
        "max_num_seqs": ("7", lambda o: o.engine.max_num_seqs == 7),
        "enable_prefix_caching": ("false", lambda o: o.engine.enable_prefix_caching is False),
        "host": ("0.0.0.0", lambda o: o.host == "0.0.0.0"),
        "port": ("9", lambda o: o.port == 9),
        "max_waiting": ("11", lambda o: o.engine.max_waiting == 11),
        "max_request_body": ("4KiB", lambda o: o.max_body_bytes == 4096),
        "drain_timeout": ("1.5", lambda o: o.drain_timeout == 1.5),
        "log_level": ("debug", lambda o: o.log_level == "debug"),
        "api_key": ("k", lambda o: o.api_key == "k"),
        "admin_api_key": ("a", lambda o: o.admin_api_key == "a"),
    }
    _, serve = build_parser()
    from server.settings import env_name, options_of
    assert sorted(options_of(serve)) == sorted(cases)
    for dest, (value, check) in cases.items():
        environ = ({env_name(dest): value} if isinstance(value, str) else value if value is not None
                   else {"PEFTSERVE_ADAPTER": "x=/p", "PEFTSERVE_PIN": "x"})
        options = parse([] if dest in ("model", "merge") else ["--model", model_dir], environ)
        assert check(options), dest
