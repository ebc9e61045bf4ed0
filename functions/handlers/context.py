"""What every handler gets: the settings, the bus (with the registry), the runtime, the store."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from functions.core.bus import Bus
from functions.core.settings import Settings

if TYPE_CHECKING:
    from agent.storage import Store
    from functions.core.registry import TaskRegistry
    from functions.core.runtime_api import Runtime


@dataclass
class Context:
    """What a handler may use: settings, the bus (with the registry), the runtime, the store.

    Build one per process: `Context(settings, await Bus.open(settings.nats_url), runtime)`."""

    settings: Settings
    bus: Bus
    runtime: "Runtime"

    @property
    def registry(self) -> "TaskRegistry":
        return self.bus.registry

    @cached_property
    def store(self) -> "Store":
        """The object store of snapshots (settings.store), opened on first use."""
        from agent.storage import open_store

        return open_store(self.settings.store)
