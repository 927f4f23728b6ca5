"""Prompt tokenization for the HTTP side, off the event loop and bounded in time and memory.

- Worker threads, each with its own copy of the tokenizer (a Rust tokenizer must not be shared across threads),
  so a megabyte prompt never stalls the event loop (/health, other streams) and other prompts go meanwhile.
- A prompt that cannot fit is refused before it is tokenized: no token decodes to more than `max_token_chars`
  characters, so a text longer than `CHARS_SLACK * max_token_chars * context` characters has more than
  `context` tokens. CHARS_SLACK covers normalizers that compose characters (NFC turns up to 3 into 1).
  Worked example: longest token 80 characters (81 with the margin below), 2048 tokens of context: a prompt
  over 4 * 81 * 2048 = 663,552 characters is a 400 at once, instead of seconds of tokenizing.
- After a large job the worker hands freed heap back to the OS (glibc's malloc_trim): tokenizing 2 MB of text
  takes ~280 MB that glibc would otherwise keep in the worker thread's arena for good.
"""
from __future__ import annotations

import asyncio
import copy
import ctypes
import ctypes.util
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from server.sampling import ParamError

T = TypeVar("T")
CHARS_SLACK = 4
TRIM_AFTER_CHARS = 2**18          # jobs over this many characters give their memory back afterwards


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on other C libraries (nothing to do there)."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


_MALLOC_TRIM = _find_malloc_trim()


class PromptTokenizer:
    def __init__(self, tokenizer, num_threads: int = 2):
        self._spares: queue.SimpleQueue = queue.SimpleQueue()      # one copy per worker, made up front
        for _ in range(num_threads):
            self._spares.put(copy.deepcopy(tokenizer))
        self._local = threading.local()
        self._threads = ThreadPoolExecutor(num_threads, thread_name_prefix="tokenize")
        # +1: decoding a token alone may drop its leading space (SentencePiece's "▁hello" -> "hello")
        ids = [[i] for i in sorted(set(tokenizer.get_vocab().values()))]
        decoded = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
        self.max_token_chars = 1 + max((len(text) for text in [*decoded, *tokenizer.get_added_vocab()]), default=1)

    def check_length(self, text: str, context_len: int, param: str) -> None:
        """ParamError if `text` has more characters than any prompt of `context_len` tokens can have."""
        limit = CHARS_SLACK * self.max_token_chars * context_len
        if len(text) > limit:
            raise ParamError(f"This model's maximum context length is {context_len} tokens; the {param} has "
                             f"{len(text)} characters, more than {limit}, which no {context_len}-token text "
                             f"exceeds. Shorten it.", param)

    async def run(self, fn: Callable[..., T], num_chars: int = 0) -> T:
        """`fn(tokenizer)` on a worker thread; `num_chars`: the size of the text it handles."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._call, fn, num_chars)

    def _call(self, fn: Callable[..., T], num_chars: int) -> T:
        if not hasattr(self._local, "tokenizer"):        # this worker's first job: take its own copy
            self._local.tokenizer = self._spares.get_nowait()
        try:
            return fn(self._local.tokenizer)
        finally:
            if num_chars > TRIM_AFTER_CHARS and _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
