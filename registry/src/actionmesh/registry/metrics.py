"""The registry's metric: registered providers by the health state of their last check.

Exposed with ``expose_metrics`` when ``metrics_port`` >= 0 (see
:mod:`actionmesh.runtime.metrics`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from opentelemetry.metrics import Observation

from actionmesh.registry.directory import Directory
from actionmesh.registry.model import Health
from actionmesh.rpc.server import RunningServer
from actionmesh.runtime.metrics import ObservedGauge

# A scrape waits at most this long for the directory's answer.
READ_TIMEOUT_S = 2.0

PROVIDERS = ObservedGauge(
    "actionmesh.registry",
    "actionmesh.registry.providers",
    unit="{provider}",
    description="Registered providers by the health state of their last check "
    "(serving, not_serving, unknown).",
)


def observe_registry(running: RunningServer, directory: Directory) -> None:
    """Report the directory's providers by health until the registry stops."""
    loop = asyncio.get_running_loop()

    def by_health() -> Iterable[Observation]:
        # Scrapes run on the HTTP server's thread; the directory lives on the loop.
        providers = asyncio.run_coroutine_threadsafe(directory.list_providers(), loop).result(
            READ_TIMEOUT_S
        )
        counts = {health.value: 0 for health in Health}
        for provider in providers:
            counts[provider.health.value] += 1
        return [Observation(n, {"health": health}) for health, n in counts.items()]

    detach = PROVIDERS.attach(by_health)

    async def stop() -> None:
        detach()

    # First among the stop hooks: before the directory and its database close.
    running.on_stop.insert(0, stop)
