"""The order of this step's sequences in the flat token batch, shared by the runner and adapter runtimes."""
from __future__ import annotations

from dataclasses import dataclass

from server.scheduler import ScheduledSeq


@dataclass
class StepLayout:
    items: list[ScheduledSeq]     # in batch order: item i's tokens are rows rows[i] .. rows[i] + num_tokens - 1
    rows: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)
