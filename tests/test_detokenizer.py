"""Incremental detokenization and stop strings, on a real byte-level BPE tokenizer."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.detokenizer import Detokenizer

TEXT = "def hello(name):\n    return f'héllo {name} ✓'  # done\nprint(hello('x'))\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def stream(tok, ids, stop, min_tokens=0):
    d = Detokenizer(tok, tok.encode("prompt: "), stop, min_tokens)
    parts = []
    for i, t in enumerate(ids):
        stopped = d.add(t)
        parts.append(d.delta(final=stopped or i == len(ids) - 1))
        if stopped:
            break
    return parts, stopped


def test_deltas_concatenate_to_the_full_decode(tok):
    ids = tok.encode(TEXT)
    parts, stopped = stream(tok, ids, [])
    assert not stopped
    assert "".join(parts) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in parts)       # multi-byte characters are never split


@pytest.mark.parametrize("stop,expected", [
    (["return"], "def hello(name):\n    "),
    (["✓"], "def hello(name):\n    return f'héllo {name} "),
    (["nope", "print("], "def hello(name):\n    return f'héllo {name} ✓'  # done\n"),
])
def test_stop_strings_cut_the_text_and_never_leak(tok, stop, expected):
    parts, stopped = stream(tok, tok.encode(TEXT), stop)
    assert stopped
    assert "".join(parts) == expected


def test_min_tokens_holds_stop_strings_off(tok):
    """vLLM: stop strings are not checked before min_tokens tokens; a stop string that was completed earlier does
    not stop the request later, one completed by the min_tokens-th token does."""
    ids = tok.encode(TEXT)
    first = next(j for j in range(len(ids)) if "return" in tok.decode(ids[:j + 1]))   # token completing it
    parts, stopped = stream(tok, ids, ["return"], min_tokens=first + 1)
    assert stopped and "".join(parts) == "def hello(name):\n    "
    parts, stopped = stream(tok, ids, ["return"], min_tokens=first + 2)
    assert not stopped and "".join(parts) == TEXT
    parts, stopped = stream(tok, ids, ["return", "print("], min_tokens=first + 2)
    assert stopped and "".join(parts) == "def hello(name):\n    return f'héllo {name} ✓'  # done\n"


class _NoBackend:
    """A tokenizer seen only through transformers' decode (no backend_tokenizer): the Detokenizer's fallback."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, **kwargs):
        return self.tok.decode(ids, **kwargs)

    def encode(self, text):
        return self.tok.encode(text)


def test_the_backend_decode_gives_transformers_deltas_with_special_tokens_skipped(tok):
    ids = tok.encode(TEXT)
    ids = ids[:5] + [tok.eos_token_id] + ids[5:]          # a special token mid-output: skipped by both paths
    fast, _ = stream(tok, ids, [])
    slow, _ = stream(_NoBackend(tok), ids, [])
    assert Detokenizer(tok, [], []).backend is not None and Detokenizer(_NoBackend(tok), [], []).backend is None
    assert fast == slow and "".join(fast) == TEXT
