"""Model directories built once into the cache (`$PEFTSERVE_CACHE`, default `~/.cache/peftserve`), atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("PEFTSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peftserve"))


def build_once(target: Path, build: Callable[[Path], None]) -> str:
    """Return `target`, first running `build(tmp)` into a temporary sibling that is renamed into place, unless
    `target/config.json` already exists. Concurrent first calls never see a half-written directory; a failed
    build leaves nothing behind."""
    target = Path(target)
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)        # mkdtemp makes it owner-only
        try:
            os.rename(tmp, target)
        except OSError:             # another process won the race; its copy is identical
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
