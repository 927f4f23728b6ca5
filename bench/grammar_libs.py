"""Grammar libraries for structured output, measured on the demo model's tokenizer (issue #14).

    python -m bench.grammar_libs [--libs xgrammar llguidance outlines_core] [--repeats 5] [--batch 16]

For each library, on SmolLM2-135M-Instruct's tokenizer (vocab 49152):
- tokenizer setup: the one-time per-tokenizer preprocessing (s)
- compile: a small JSON schema (nested object, enum, array, integer), the same with maxLength on two strings,
  and json_object (any JSON object); each from a fresh compiler (no cache), up to a matcher ready for its first
  mask, median of --repeats (ms); and the first mask of the bounded schema (where a lazy library pays)
- mask per token: walking the tokens of a valid JSON output for the schema, the time to compute the next-token
  bitmask at each position (p50 / p99 over every position of --repeats walks), then accepting the token (us);
  every walked token is checked to be allowed by the mask (a library that rejects valid output fails here)
- batch mask: --batch matchers at different positions, one step's masks for all (the library's batched /
  parallel call where it has one, else a loop) (ms)
- overlap: that batch's masks, one matcher after another on a worker thread (as server/guided.py does), repeated
  for ~0.2 s while the main thread runs a torch matmul loop of the same length (the model's forward stands in):
  hidden = (mask alone + matmul alone - both) / the shorter. 1.0 = fully hidden, 0.0 = serialized. On a 2-core
  machine the matmul's 2 threads already use both cores, so some serialization is the CPU's, not the GIL's.
One JSON line per library, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
from transformers import AutoTokenizer

from bench.common import emit, machine
from server.default_model import ensure_default_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["engineer", "scientist", "artist"]},
        "languages": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "languages", "address"],
    "additionalProperties": False,
}
# the same with length bounds on its strings (as the tests' schemas have): compile time only
SCHEMA_BOUNDED = {**SCHEMA, "properties": {**SCHEMA["properties"], "name": {"type": "string", "maxLength": 64},
                                           "languages": {"type": "array", "items": {"type": "string",
                                                                                    "maxLength": 32}}}}
DOC = ('{"name": "Ada Lovelace", "age": 36, "role": "scientist", "languages": ["English", "French", "Italian"], '
       '"address": {"city": "London", "zip": "W1J 7NT"}}')


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size

    def compile_schema(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema))

    def compile_json_object(self):
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False).compile_builtin_json_grammar()

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token):
        assert matcher.accept_token(token), token

    def fill_batch(self, matchers, bitmask):
        if not hasattr(self, "_batch"):
            self._batch = self.xgr.BatchGrammarMatcher(max_threads=2)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor(num_threads=1)

    def _compile(self, grammar):
        # what server/guided.py does at admission: a matcher (parser built, error checked) that requests copy
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def compile_schema(self, schema):
        return self._compile(self.llg.LLMatcher.grammar_from_json_schema(schema))

    def compile_json_object(self):
        return self._compile(self.llg.LLMatcher.grammar_from_json_schema({"type": "object"}))

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask, row):
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()

    def fill_batch(self, matchers, bitmask):
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)


class OutlinesCore:
    name = "outlines_core"

    def __init__(self, tokenizer, vocab_size):
        import outlines_core
        self.oc = outlines_core
        decode = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i not in special:
                tokens.setdefault(bytes(decode[c] for c in token), []).append(i)
        self.vocab = outlines_core.Vocabulary(tokenizer.eos_token_id, tokens)

    def compile_schema(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def compile_json_object(self):
        # no JSON grammar: a regex from {"type": "object"} (bounded nesting)
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps({"type": "object"}))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, guide, bitmask, row):
        v = bitmask[row]
        guide.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def accept(self, guide, token):
        guide.advance(token)

    def fill_batch(self, guides, bitmask):
        for i, g in enumerate(guides):
            self.fill(g, bitmask, i)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the character standing for it in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


LIBS = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines_core": OutlinesCore}


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def measure(lib_name: str, tokenizer, vocab_size: int, repeats: int, batch: int) -> dict:
    t0 = time.perf_counter()
    lib = LIBS[lib_name](tokenizer, vocab_size)
    setup = time.perf_counter() - t0
    compile_schema, compile_object, compile_bounded, first_mask = [], [], [], []
    one = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = lib.compile_schema(SCHEMA)
        compile_schema.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bounded = lib.compile_schema(SCHEMA_BOUNDED)
        compile_bounded.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lib.fill(lib.matcher(bounded), one, 0)          # a lazy library pays here what it skipped compiling
        first_mask.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lib.compile_json_object()
        compile_object.append(time.perf_counter() - t0)
    tokens = tokenizer.encode(DOC, add_special_tokens=False)
    bitmask = torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    per_token = []
    for _ in range(repeats):
        matcher = lib.matcher(compiled)
        for token in tokens:
            t0 = time.perf_counter()
            lib.fill(matcher, bitmask, 0)
            per_token.append(time.perf_counter() - t0)
            assert allowed(bitmask, 0, token), (lib_name, tokenizer.decode([token]))
            lib.accept(matcher, token)
        lib.fill(matcher, bitmask, 0)
        assert allowed(bitmask, 0, tokenizer.eos_token_id), f"{lib_name}: EOS not allowed at the end"
    # a batch of matchers at positions spread over the document
    matchers = []
    for i in range(batch):
        m = lib.matcher(compiled)
        for token in tokens[:i * (len(tokens) - 1) // max(batch - 1, 1)]:
            lib.accept(m, token)
        matchers.append(m)
    lib.fill_batch(matchers, bitmask)
    batch_times = []
    for _ in range(200):
        t0 = time.perf_counter()
        lib.fill_batch(matchers, bitmask)
        batch_times.append(time.perf_counter() - t0)
    overlap = _overlap(lambda: [lib.fill(m, bitmask, i) for i, m in enumerate(matchers)])
    return {"lib": lib_name, "tokenizer_setup_s": round(setup, 3),
            "compile_schema_ms": _ms(statistics.median(compile_schema)),
            "compile_json_object_ms": _ms(statistics.median(compile_object)),
            "compile_bounded_schema_ms": _ms(statistics.median(compile_bounded)),
            "bounded_first_mask_ms": _ms(statistics.median(first_mask)),
            "mask_p50_us": round(_pct(per_token, 0.5) * 1e6, 1), "mask_p99_us": round(_pct(per_token, 0.99) * 1e6, 1),
            "num_tokens_walked": len(per_token), f"batch{batch}_mask_ms": _ms(statistics.median(batch_times)),
            "overlap": overlap}


def _overlap(one_round) -> float:
    """Fraction of a ~0.2 s mask loop (one worker thread, one matcher after another) hidden behind a torch matmul
    loop of the same length on the main thread (lm_head-sized: [16, 576] @ [576, 49152])."""
    t0 = time.perf_counter()
    one_round()
    rounds = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-7)))

    def masks():
        for _ in range(rounds):
            one_round()
    t0 = time.perf_counter()
    masks()
    masks_s = time.perf_counter() - t0
    a, b = torch.randn(16, 576), torch.randn(576, 49152)
    t0 = time.perf_counter()
    a @ b
    num = max(1, int(masks_s / (time.perf_counter() - t0)))
    t0 = time.perf_counter()
    for _ in range(num):
        a @ b
    matmul_s = time.perf_counter() - t0
    thread = threading.Thread(target=masks)
    t0 = time.perf_counter()
    thread.start()
    for _ in range(num):
        a @ b
    thread.join()
    both = time.perf_counter() - t0
    hidden = matmul_s + masks_s - both
    return round(max(0.0, min(1.0, hidden / min(matmul_s, masks_s))), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    vocab_size = 49152
    rows = []
    for name in args.libs:
        row = measure(name, tokenizer, vocab_size, args.repeats, args.batch)
        emit(row)
        rows.append(row)
    print(f"\n{machine()}; SmolLM2-135M-Instruct tokenizer, vocab {vocab_size}\n")
    print(f"| library | tokenizer setup s | compile schema ms | compile schema + maxLength ms (+ its first mask) "
          f"| compile json_object ms | mask p50 us | mask p99 us | batch {args.batch} mask ms | overlap with matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lib']} | {r['tokenizer_setup_s']} | {r['compile_schema_ms']} | {r['compile_bounded_schema_ms']} "
              f"(+ {r['bounded_first_mask_ms']}) | {r['compile_json_object_ms']} | {r['mask_p50_us']} "
              f"| {r['mask_p99_us']} | {r[f'batch{args.batch}_mask_ms']} | {r['overlap']} |")


if __name__ == "__main__":
    main()
