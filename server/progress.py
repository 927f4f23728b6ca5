"""Progress bars on stderr for slow startup work (weights, adapters); shown only on a terminal, so logs and
pipes stay clean."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None,
             unit: str = "it") -> Iterator[T]:
    """`items`, with a bar while they are consumed when stderr is a terminal."""
    yield from tqdm(items, desc=description, total=total, unit=unit, leave=False, file=sys.stderr,
                    disable=not sys.stderr.isatty(), dynamic_ncols=True)
