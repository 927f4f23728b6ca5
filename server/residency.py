"""The registry's make_resident as the scheduler calls it, with install failures kept apart."""
from __future__ import annotations

import logging

from adapters.registry import AdapterRegistry

log = logging.getLogger("server.engine")


class IsolatedResidency:
    """The registry's make_resident for the scheduler, with failures kept apart: an adapter whose install raises
    (a checkpoint that changed, out of memory growing a stack) is "not on the device" for this step, and the
    engine fails the requests waiting for it instead of the step failing every request in flight."""

    def __init__(self, registry: AdapterRegistry):
        self.registry = registry
        self._failures: dict = {}                  # handle -> the exception its install raised

    def make_resident(self, adapter, busy: set) -> bool:
        if adapter in self._failures:
            return False
        try:
            return self.registry.make_resident(adapter, busy)
        except Exception as exc:
            log.exception("installing adapter %r failed", adapter.name)
            self._failures[adapter] = exc
            return False

    def take_failures(self) -> list[tuple]:
        failures, self._failures = list(self._failures.items()), {}
        return failures
