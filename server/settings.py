"""Where `peftserve serve` options come from: a flag, a `PEFTSERVE_*` environment variable, or a YAML file given by
`--config FILE` (or `PEFTSERVE_CONFIG`); the first of those that sets an option wins (flag > env > file).

Every flag has both other forms: `--kv-cache-memory 4GiB` is `PEFTSERVE_KV_CACHE_MEMORY=4GiB` and, in the file,
`kv-cache-memory: 4GiB` (or `kv_cache_memory`). Repeatable flags take a YAML list, or in the environment
several values split like a shell line (`PEFTSERVE_ADAPTER="sql=/a/sql chat=/a/chat"`); their values come
from one source, never merged. Switches take true / false (env: 1, true, yes, on / 0, false, no, off).

Values from env and file are checked by the flag's own parser and a bad one names its source:
    PEFTSERVE_PORT=http: --port: expected a positive integer, got 'http'
The result is argv for argparse: the CLI's own arguments after the ones taken from env and file.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shlex

import yaml

ENV_PREFIX = "PEFTSERVE_"
CONFIG_ENV = "PEFTSERVE_CONFIG"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A bad config file or environment value; the message names where it came from."""


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every --flag of `parser` (not --help / --config)."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in ("help", "config") and a.option_strings[0].startswith("--")}


def explicit_dests(parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser,
                   argv: list[str]) -> set[str]:
    """The dests that `argv` itself sets (parsed once more with every default suppressed)."""
    saved = {a: a.default for a in parser._actions + subparser._actions}
    try:
        for action in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved.items():
            action.default = default


def read_config_file(path: str, options: dict[str, argparse.Action]) -> dict[str, object]:
    """dest -> value from a YAML mapping of flag names (dashes or underscores, no leading --)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    values = {}
    names = sorted(d.replace("_", "-") for d in options)
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in options:
            close = difflib.get_close_matches(str(key).replace("_", "-"), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(f"--config {path}: unknown option {key!r}{hint}")
        values[dest] = (value, f"--config {path}: {key}")
    return values


def read_env(environ: dict[str, str], options: dict[str, argparse.Action]) -> dict[str, object]:
    """dest -> (value, source) from PEFTSERVE_<DEST> variables (others, such as PEFTSERVE_CACHE, are not flags)."""
    return {dest: (environ[env_name(dest)], env_name(dest)) for dest in options if env_name(dest) in environ}


def to_argv(action: argparse.Action, value, source: str) -> list[str]:
    """The flag tokens that set `value`, after checking it with the flag's own type and choices."""
    flag = action.option_strings[0]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [flag] if _boolean(value, source) == isinstance(action, argparse._StoreTrueAction) else []
    if isinstance(action, argparse.BooleanOptionalAction):             # --flag / --no-flag
        return [flag] if _boolean(value, source) else [action.option_strings[1]]
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else shlex.split(value) if isinstance(value, str) else [value]
    elif isinstance(value, (list, dict)):
        raise SettingsError(f"{source}: {flag} takes one value, got {value!r}")
    else:
        items = [value]
    tokens = []
    for item in items:
        if isinstance(item, (list, dict)) or item is None:
            raise SettingsError(f"{source}: {flag} takes text or numbers, got {item!r}")
        text = _text(item)
        try:
            checked = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise SettingsError(f"{source}={text}: {flag}: {exc}") from None
        if action.choices is not None and checked not in action.choices:
            raise SettingsError(f"{source}={text}: {flag}: expected one of {', '.join(map(str, action.choices))}")
        tokens += [flag, text]
    return tokens


def layered_argv(parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser, argv: list[str],
                 environ: dict[str, str] | None = None) -> list[str]:
    """argv with every option the CLI leaves unset filled from env, else from the config file.

    `argv` starts with the command ("serve"); `subparser` is that command's parser."""
    environ = os.environ if environ is None else environ
    options = options_of(subparser)
    config = _config_path(parser, argv, environ)            # first: --help exits here, with the real defaults
    given = explicit_dests(parser, subparser, argv)
    layers = [read_env(environ, options), read_config_file(config, options) if config else {}]
    extra: list[str] = []
    for dest, action in options.items():
        if dest in given:
            continue
        for layer in layers:
            if dest in layer:
                extra += to_argv(action, *layer[dest])
                break
    return argv[:1] + extra + argv[1:]


def _config_path(parser, argv, environ) -> str | None:
    known, _ = parser.parse_known_args(argv)
    return getattr(known, "config", None) or environ.get(CONFIG_ENV) or None


def _boolean(value, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE | FALSE:
        return text in TRUE
    raise SettingsError(f"{source}={value}: expected true or false")


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
