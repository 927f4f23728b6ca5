"""One request's state as the scheduler sees it. Pure Python: no tensors."""
from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import TYPE_CHECKING

from server.sampling import SamplingParams

if TYPE_CHECKING:
    from server.shared_prefix import SharedPrefix


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class FinishReason(str, Enum):
    STOP = "stop"          # EOS, stop token or stop string
    LENGTH = "length"      # max_tokens or max_model_len reached
    ABORT = "abort"        # client went away or server shutdown


_counter = itertools.count()


class Sequence:
    """A request: prompt ids, generated ids, and how much of it is in the KV cache.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the rest are pending: the whole prompt at
    first (prefilled in one or more chunks), then exactly one token (the last sampled) per decode step.
    `num_virtual_tokens`: its adapter's prefix / prompt-tuning tokens (0 for other kinds). They are not the
    sequence's tokens: every count here is of its own tokens, and its own token i has position
    `first_position + i` (`first_position`: num_virtual_tokens by default, as PEFT; 0 for AdapterHub prefixes,
    whose keys carry no position). Their K/V live in the adapter's shared blocks (`prefix`), which the block manager
    attaches at the head of `block_table` on (re-)admission and detaches when it frees the sequence.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter=None,
                 first_adapter_layer: int = 0, arrival: float = 0.0, num_virtual_tokens: int = 0,
                 first_position: int | None = None):
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.seq_no = next(_counter)          # arrival order, for FCFS and preemption
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.adapter = adapter                # adapter handle or None for the base model
        self.first_adapter_layer = first_adapter_layer   # AdapterDrop: layers below this skip the adapter
        self.arrival = arrival
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.num_virtual_tokens = num_virtual_tokens
        self.first_position = num_virtual_tokens if first_position is None else first_position
        self.prefix: SharedPrefix | None = None     # while it holds blocks and has virtual tokens
        self.block_table: list[int] = []            # prefix.blocks (if any), then its own blocks
        self.cached_chain: list[int] = []           # prefix-cache entry ids of its leading full own blocks
        self.num_preemptions = 0
        self.num_forks = 0      # more samples of this prompt (n > 1) to fork from it once its prompt is computed
        # Adapters that take values over the whole prompt (UniPELT's gates): its first prefill is one chunk, its
        # KV stays out of the prefix cache, and the values live in adapter_state (adapters.interface.StepItem).
        self.whole_prompt = False
        self.adapter_state: dict = {}

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, prompt={self.num_prompt_tokens}, out={len(self.output_ids)}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_prefix_blocks(self) -> int:
        return len(self.prefix.blocks) if self.prefix is not None else 0

    @property
    def needs_whole_prompt(self) -> bool:
        """Its next prefill must run the whole prompt in one chunk (its adapter has not taken its values yet)."""
        return self.whole_prompt and not self.adapter_state

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the KV cache (the whole prompt at first, then 1 per decode step)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """all_ids[i] without building all_ids (a decode step reads one token a sequence)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_ids.append(token_id)
