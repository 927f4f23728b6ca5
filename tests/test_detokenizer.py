"""Incremental detokenization and stop strings, on a real byte-level BPE tokenizer."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.detokenizer import Detokenizer

TEXT = "def hello(name):\n    return f'héllo {name} ✓'  # done\nprint(hello('x'))\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def stream(tok, ids, stop):
    d = Detokenizer(tok, tok.encode("prompt: "), stop)
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
