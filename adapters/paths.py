"""Where adapters may be read from: inside the allowed roots, after every symlink is resolved.

The roots are the `--adapter-dir` directories (a relative `lora_path`, or a just-in-time adapter name, is looked
up in each) and the directories of preloaded adapters (`--adapter NAME=PATH`, so they can be reloaded). A path
is refused, before anything is read, when it:
    - has a ".." component                 ("../other", "a/../../etc"): traversal, even if it lands inside
    - is not under a root                  ("/etc/x")
    - resolves outside every root          (a symlink, or a symlinked parent, pointing elsewhere)
    - holds an entry resolving outside     (adapter_model.safetensors -> /elsewhere/secret)
Worked example, roots ["/srv/adapters"]: "sql" -> "/srv/adapters/sql"; "/srv/adapters/sql" -> itself;
"/srv/adapters/../x" and "sql/../../x" -> AdapterPathError; "nope" (absent) -> AdapterPathNotFound.
"""
from __future__ import annotations

import os

from adapters.config import CONFIG_NAME, AdapterError, is_fusion_dir


class AdapterPathError(AdapterError):
    """The path is not allowed (HTTP 400)."""


class AdapterPathNotFound(AdapterError):
    """No adapter directory there (HTTP 404; vLLM's "No adapter found")."""


class AdapterRoots:
    def __init__(self, adapter_dirs: list[str] = (), extra_dirs: list[str] = ()):
        """`adapter_dirs`: searched for relative paths and adapter names; `extra_dirs`: also allowed."""
        self.adapter_dirs = [os.path.realpath(d) for d in adapter_dirs]
        self.allowed = self.adapter_dirs + [os.path.realpath(d) for d in extra_dirs]
        # as spelled, for the lexical check (a root given through a symlink is still that root)
        self._spelled = self.allowed + [os.path.abspath(d) for d in (*adapter_dirs, *extra_dirs)]

    def resolve(self, path: str) -> str:
        """The real path of the adapter directory `path` names; AdapterPathError / AdapterPathNotFound."""
        if not path or "\0" in path:
            raise AdapterPathError(f"invalid adapter path {path!r}")
        if ".." in path.replace("\\", "/").split("/"):
            raise AdapterPathError(f"adapter path {path!r} contains '..': path traversal is not allowed")
        if os.path.isabs(path):
            candidates = [os.path.normpath(path)]
            if not any(self._inside(candidates[0], root) for root in self._spelled):
                raise AdapterPathError(f"adapter path {path!r} is outside the allowed adapter directories "
                                       f"(--adapter-dir{', preloaded adapters' if self.extra else ''})")
        else:
            if not self.adapter_dirs:
                raise AdapterPathError(f"relative adapter path {path!r} needs an --adapter-dir to resolve it in")
            candidates = [os.path.join(root, path) for root in self.adapter_dirs]
        for candidate in candidates:
            if os.path.lexists(candidate):
                return self._checked(path, candidate)
        raise AdapterPathNotFound(f"No adapter found at {path!r}")

    def find(self, name: str) -> str | None:
        """The real path of adapter `name` in an --adapter-dir (just-in-time loading), None if there is none.
        AdapterPathError for a name that would leave the directory."""
        if not self.adapter_dirs or not name or os.path.isabs(name):
            return None
        try:
            return self.resolve(name)
        except AdapterPathNotFound:
            return None

    @property
    def extra(self) -> bool:
        return len(self.allowed) > len(self.adapter_dirs)

    def _checked(self, path: str, candidate: str) -> str:
        real = os.path.realpath(candidate)
        if not any(self._inside(real, root) for root in self.allowed):
            raise AdapterPathError(f"adapter path {path!r} is or passes through a symlink leading outside the "
                                   f"allowed adapter directories")
        has_config = os.path.isfile(os.path.join(real, CONFIG_NAME)) or is_fusion_dir(real)
        if not os.path.isdir(real) or not has_config:
            raise AdapterPathNotFound(f"No adapter found at {path!r} (no directory with {CONFIG_NAME})")
        for entry in os.scandir(real):
            target = os.path.realpath(entry.path)
            if not any(self._inside(target, root) for root in self.allowed):
                raise AdapterPathError(f"adapter path {path!r}: {entry.name} is a symlink leading outside the "
                                       f"allowed adapter directories")
        return real

    @staticmethod
    def _inside(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
