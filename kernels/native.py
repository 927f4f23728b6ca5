"""CPU kernels written in C (kernels/*.c): compiled once per machine, loaded with ctypes.

A source is compiled with the system C compiler (`$CC`, default `cc`) and -march=native, so the build is keyed
on the source, the flags, the compiler's version and this CPU's flags, into `$PEFTSERVE_CACHE/kernels/`
(written to a temporary name and renamed: concurrent first uses never load a half-written file). The kernels
parallelise with OpenMP, linked against the libgomp that torch has already loaded (same soname), so they run on
torch's worker team of the calling thread instead of starting a second one (see kernels/cpu_threads.py for why
two teams hurt). `load(name)` is None where no compiler works or `PEFTSERVE_NATIVE_KERNELS=0`; callers then use
their torch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from kernels/{name}.c, or None (logged once) when it cannot be built."""
    if os.environ.get("PEFTSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(_build(Path(__file__).with_name(f"{name}.c"))))
    except subprocess.CalledProcessError as e:
        log.warning("C kernel %s failed to compile; using the torch path:\n%s", name, (e.stderr or "")[-2000:])
    except OSError as e:
        log.warning("C kernel %s unavailable (%s); using the torch path", name, e)
    return None


def load_functions(name: str, functions, argtypes: list) -> ctypes.CDLL | None:
    """`load(name)` with each of `functions` typed (no result, `argtypes`), or None."""
    lib = load(name)
    if lib is not None:
        for function in functions:
            fn = getattr(lib, function)
            fn.restype = None
            fn.argtypes = list(argtypes)
    return lib


def _build(source: Path) -> Path:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise OSError("no C compiler (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]       # what the sources #include
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    root = Path(os.environ.get("PEFTSERVE_CACHE") or Path.home() / ".cache" / "peftserve") / "kernels"
    target = root / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=root)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, check=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. "avx512f"): what -march=native compiles the kernels for."""
    return flag in _cpu_flags().split()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""
