"""Hypothesis strategies for JSON values from the JSON schemas in /openapi.json (the subset pydantic writes:
$ref, anyOf, object / array / string / integer / number / boolean / null, const / enum, and the limits
minimum / maximum / exclusiveMinimum, minLength / maxLength / pattern, minItems / maxItems)."""
from __future__ import annotations

from hypothesis import strategies as st

MAX_TEXT = 24         # long enough for stop strings and names; prompts stay short so requests are fast
MAX_ITEMS = 5

# JSON of any shape, for fields replaced by garbage (negative fuzzing)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)

# text with the odd character JSON allows but is not text: lone surrogates, NUL
TEXT_CHARS = st.characters(codec=None, categories=None) | st.sampled_from(["\ud800", "\udfff", "\x00"])


def from_schema(schema: dict, spec: dict) -> st.SearchStrategy:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(spec["components"]["schemas"][name], spec))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, spec) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(_int(schema.get("minimum")), _int(schema.get("maximum")))
    if kind == "number":
        return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum"),
                         exclude_min="exclusiveMinimum" in schema, allow_nan=False, allow_infinity=False)
    if kind == "string":
        if "pattern" in schema:
            pattern = st.from_regex(schema["pattern"], fullmatch=True)
            return pattern.filter(lambda s: schema.get("minLength", 0) <= len(s) <= schema.get("maxLength", 10**9))
        low = schema.get("minLength", 0)
        return st.text(TEXT_CHARS, min_size=low, max_size=min(schema.get("maxLength", MAX_TEXT), low + MAX_TEXT))
    if kind == "array":
        low = schema.get("minItems", 0)
        return st.lists(from_schema(schema.get("items", {}), spec), min_size=low,
                        max_size=min(schema.get("maxItems", MAX_ITEMS), low + MAX_ITEMS))
    if kind == "object":
        return _object(schema, spec)
    return ANY_JSON                           # {}: anything


def _int(bound) -> int | None:
    return None if bound is None else int(bound)


def _object(schema: dict, spec: dict) -> st.SearchStrategy:
    properties = schema.get("properties", {})
    if not properties:
        return st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=2)
    required = set(schema.get("required", []))

    @st.composite
    def build(draw):
        out = {}
        for name, sub in properties.items():
            if name in required or draw(st.booleans()):
                out[name] = draw(from_schema(sub, spec))
        return out
    return build()
