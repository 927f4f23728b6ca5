"""Structured output: what a request's output must match (GuidedSpec, from its OpenAI / vLLM fields) and the
grammars compiled for it (GrammarCache, llguidance; bench/grammar_libs.py and the README say why).

Kinds: "json_schema" (a JSON schema, as JSON text), "json_object" (any JSON object), "regex", "choice" (one of
a list of strings, as JSON text) and "grammar" (Lark as llguidance reads it, or GBNF, converted to it).
JSON comes out on one line with ", " / ": " separators: free whitespace lets a small model loop on newlines.
server/guided_decoding.py applies the compiled grammars to each step's logits.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from server.sampling import ParamError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_CACHED_GRAMMARS = 256          # compiled grammars kept, least recently used dropped first
MAX_CHOICES = 1024


@dataclass(frozen=True)
class GuidedSpec:
    kind: str
    spec: str = ""                 # JSON schema / regex / choices (JSON list) / EBNF; "" for json_object
    param: str = "response_format"  # the request field it came from, named by its errors
    strict: bool = False           # json_schema: properties not listed are not allowed unless the schema says so

    def __post_init__(self):
        assert self.kind in KINDS, self.kind

    @property
    def key(self) -> tuple:
        return self.kind, self.spec, self.strict


def guided_spec(response_format=None, guided_json=None, guided_regex: str | None = None,
                guided_choice: list[str] | None = None, guided_grammar: str | None = None) -> GuidedSpec | None:
    """The one constraint a request asks for, or None. `response_format`: OpenAI's
    {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}} as a dict;
    the others are vLLM's fields. More than one constraint is a ParamError."""
    given = {name: value for name, value in [("guided_json", guided_json), ("guided_regex", guided_regex),
                                             ("guided_choice", guided_choice), ("guided_grammar", guided_grammar)]
             if value is not None}
    if response_format is not None and response_format.get("type", "text") != "text":
        given = {"response_format": response_format, **given}
    if len(given) > 1:
        raise ParamError(f"only one of response_format (json_object / json_schema), guided_json, guided_regex, "
                         f"guided_choice, guided_grammar may be given, got {', '.join(given)}", list(given)[1])
    if not given:
        return None
    (param, value), = given.items()
    if param == "response_format":
        return _response_format(value)
    if param == "guided_json":
        return GuidedSpec("json_schema", _schema_text(value, param), param)
    if param == "guided_regex":
        if not value:
            raise ParamError("guided_regex must be a non-empty regular expression", param)
        return GuidedSpec("regex", value, param)
    if param == "guided_choice":
        if not value or len(value) > MAX_CHOICES or not all(isinstance(c, str) and c for c in value):
            raise ParamError(f"guided_choice must be a list of 1 to {MAX_CHOICES} non-empty strings", param)
        return GuidedSpec("choice", json.dumps(list(dict.fromkeys(value))), param)
    if not value.strip():
        raise ParamError("guided_grammar must be a non-empty Lark or GBNF grammar", param)
    return GuidedSpec("grammar", value, param)


def _response_format(value: dict) -> GuidedSpec:
    kind = value.get("type")
    if kind == "json_object":
        return GuidedSpec("json_object")
    if kind != "json_schema":
        raise ParamError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                         "response_format.type")
    body = value.get("json_schema")
    if not isinstance(body, dict) or "schema" not in body:
        raise ParamError("response_format.json_schema must be an object with a 'schema' (and a 'name')",
                         "response_format.json_schema")
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ParamError("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
    return GuidedSpec("json_schema", _schema_text(body["schema"], "response_format.json_schema.schema"),
                      "response_format.json_schema.schema", strict=bool(strict))


def _schema_text(schema, param: str) -> str:
    """A schema (dict, bool, or JSON text of one) as JSON text, the cache key."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ParamError(f"the JSON schema is not valid JSON: {exc}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise ParamError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}", param)
    return json.dumps(schema, ensure_ascii=False)       # key order kept: properties come out in it


class GrammarCache:
    """Compiles GuidedSpecs for one tokenizer with llguidance, keeping the last MAX_CACHED_GRAMMARS by key: each
    entry a fresh LLMatcher that requests copy (`matcher(spec)`). Thread-safe: the HTTP side compiles at
    admission (off the event loop), the engine thread looks up the same. A spec llguidance rejects raises
    ParamError naming the request field and llguidance's reason."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_size: int = MAX_CACHED_GRAMMARS):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.max_size = max_size
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self._ll_tokenizer = None                  # built on first use (~1 s of tokenizer preprocessing)

    def compile(self, spec: GuidedSpec):
        """The spec's compiled matcher, at its start state (a template: copy it, don't advance it)."""
        with self._lock:
            compiled = self._compiled.get(spec.key)
            if compiled is not None:
                self._compiled.move_to_end(spec.key)
                return compiled
            ll_tokenizer = self._ll_tokenizer or self._new_tokenizer()
        import llguidance
        try:
            grammar = _grammar(spec)
        except Exception as exc:          # parsing user text: the GBNF converter raises bare Exceptions
            raise ParamError(f"invalid {_WHAT[spec.kind]}: {_one_line(str(exc))}", spec.param) from None
        compiled = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)   # builds the parser; GIL released
        if compiled.is_error():
            raise ParamError(f"invalid {_WHAT[spec.kind]}: {_one_line(compiled.get_error())}", spec.param)
        with self._lock:
            self._compiled[spec.key] = compiled
            while len(self._compiled) > self.max_size:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: GuidedSpec):
        """A new matcher for one request (a copy of the compiled one)."""
        return self.compile(spec).deep_copy()

    def __len__(self) -> int:
        return len(self._compiled)

    def _new_tokenizer(self):
        import llguidance.hf
        self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size,
                                                          eos_token=self.stop_token_ids)
        return self._ll_tokenizer


_WHAT = {"json_schema": "JSON schema", "json_object": "JSON", "regex": "regular expression",
         "choice": "guided_choice", "grammar": "grammar"}
# one line, ", " and ": " between items and after keys
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _grammar(spec: GuidedSpec) -> str:
    """llguidance's grammar text for a spec."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark
    if spec.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec.spec, defaults=_JSON_OPTIONS)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":            # Lark string literals take JSON's escapes
        choices = json.loads(spec.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    return LLMatcher.grammar_from_lark(any_to_lark(spec.spec))


def _one_line(message: str) -> str:
    """llguidance's multi-line messages (source excerpt, caret, repeated cause) as one line."""
    lines = []
    for line in message.strip().splitlines():
        line = line.strip()
        if line and not re.fullmatch(r"(\d+ \|.*|\^+|\|)", line) and line not in lines:
            lines.append(line)
    return " ".join(lines) or "rejected"
