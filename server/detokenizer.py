"""Incremental detokenization with stop strings.

Each step decodes only a short window of ids (prefix_offset .. end) and emits the text beyond what the
window's first part already produced; text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the
next token. Text that could still be the beginning of a stop string is held back until it can't be.
`min_tokens`: as in vLLM, stop strings are not looked for until that many tokens are generated, and then only
in text that ends at or after that token (a stop string completed earlier does not stop the request later).
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        # a fast tokenizer's own decode: what transformers' decode calls (with no clean-up, as here), without its
        # Python around it (~3x the time of the decode itself, twice a token)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.ids = list(prompt_ids[-6:])          # a little prompt context, so the first word decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""                            # decoded output so far
        self.emitted = 0                          # chars of self.text already returned
        self.stopped = False
        self.min_tokens = min_tokens
        self.num_generated = 0
        self.floor = 0                            # a stop string must end after this many chars of self.text

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Append one generated token. Returns True if a stop string now ends the output."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        self.num_generated += 1
        if self.stop and self.num_generated < self.min_tokens:
            self.floor = len(self.text)
        elif self.stop:
            search_from = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, max(search_from, self.floor - len(s) + 1)) for s in self.stop)
                    if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def delta(self, final: bool) -> str:
        """New text safe to show: all of it when `final`, else all but what a stop string could start."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            # trailing ids still waiting for more UTF-8 bytes: show them as they decode now
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
