"""Imports flow one way: api -> engine -> model -> adapters -> kernels. Checked on the source with `ast` (every
import statement, including those inside functions and TYPE_CHECKING blocks)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# modules of the serving layers above the model: nothing in adapters/ or kernels/ may import them
UPPER = ("server.engine", "server.runner", "server.kv_blocks", "server.scheduler", "server.api")


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` (a file under ROOT; its text, or `source`) imports: absolute names, and
    `from a import b` yields both a and a.b."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def offending(path: Path, banned: tuple[str, ...], source: str | None = None) -> list[str]:
    return sorted({b for m in imported_modules(path, source) for b in banned if m == b or m.startswith(b + ".")})


def test_adapters_and_kernels_import_no_serving_layer():
    files = sorted([*(ROOT / "adapters").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
    assert len(files) > 10
    bad = {str(f.relative_to(ROOT)): offending(f, UPPER) for f in files}
    assert {f: mods for f, mods in bad.items() if mods} == {}


def test_adapters_and_kernels_import_nothing_from_server():
    """Stricter than the layer list: not even data modules (the model spec lives in adapters/model_spec.py)."""
    files = sorted([*(ROOT / "adapters").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
    bad = {str(f.relative_to(ROOT)): offending(f, ("server",)) for f in files}
    assert {f: mods for f, mods in bad.items() if mods} == {}


def test_checker_sees_every_import_form():
    """The parser catches plain, from, relative, function-local and TYPE_CHECKING imports of a banned module."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from server.runner import X\n"
              "def f():\n    import server.kv_blocks\n    from ..server import engine\n"
              "from server import scheduler\nimport server.api as api\nfrom server import batch\n")
    found = offending(ROOT / "adapters" / "probe.py", UPPER, source)
    assert found == ["server.api", "server.engine", "server.kv_blocks", "server.runner", "server.scheduler"]


def test_kv_blocks_and_sequence_do_not_import_each_other():
    kv_blocks = imported_modules(ROOT / "server" / "kv_blocks.py")
    sequence = imported_modules(ROOT / "server" / "sequence.py")
    assert "server.sequence" in kv_blocks or "server.sequence.Sequence" in kv_blocks   # the direction kept
    assert not any(m.startswith("server.kv_blocks") for m in sequence)


def test_model_imports_no_serving_layer():
    """The model (and its per-step metadata) sits below the engine too."""
    files = [*(ROOT / "server" / "model").glob("*.py"), ROOT / "server" / "batch.py"]
    bad = {str(f.relative_to(ROOT)): offending(f, UPPER) for f in files}
    assert {f: mods for f, mods in bad.items() if mods} == {}
