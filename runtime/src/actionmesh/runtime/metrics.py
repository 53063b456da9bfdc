"""OpenTelemetry metrics, exposed over HTTP for Prometheus to scrape.

A service with ``metrics_port`` >= 0 calls :func:`expose_metrics` once its gRPC
server runs: the process gets an SDK ``MeterProvider`` whose reader is the
OpenTelemetry Prometheus exporter, and ``GET http://HOST:PORT/metrics`` serves
the text exposition format (port 0 picks a free port; the ready file says which).
Instruments are created at import time from the global meter API, so they cost
nothing while metrics are off and bind to the real provider once it exists.

Prometheus names follow the exporter's translation: dots become underscores,
counters get ``_total``, a unit of ``s`` becomes ``_seconds``
(``actionmesh.execution.duration`` -> ``actionmesh_execution_duration_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import start_http_server

from actionmesh.rpc.server import RunningServer
from actionmesh.rpc.telemetry import SERVICE_NAMESPACE

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# Latency buckets in seconds: gRPC calls on loopback take milliseconds, provider
# work can take up to the longest action deadline (60 s by default).
LATENCY_BUCKETS_S: Sequence[float] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_lock = threading.Lock()
_provider: MeterProvider | None = None


def configure_metrics(service_name: str) -> None:
    """Install the SDK meter provider with the Prometheus reader (once per process)."""
    global _provider
    with _lock:
        if _provider is not None:
            return
        # The reader registers with prometheus_client's default registry, which
        # also carries the process_* and python_* collectors SREs expect.
        _provider = MeterProvider(
            resource=Resource.create(
                {"service.name": service_name, "service.namespace": SERVICE_NAMESPACE}
            ),
            metric_readers=[PrometheusMetricReader()],
        )
        metrics.set_meter_provider(_provider)


@dataclass
class MetricsServer:
    """The HTTP endpoint Prometheus scrapes; ``stop()`` closes it."""

    host: str
    port: int
    _stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{METRICS_PATH}"

    def stop(self) -> None:
        self._stop()


def start_metrics_server(host: str, port: int, service_name: str) -> MetricsServer:
    """Serve this process's metrics on ``host:port`` (0 = a free port) in a daemon thread."""
    configure_metrics(service_name)
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2.0)

    return MetricsServer(host=host, port=int(server.server_port), _stop=stop)


def expose_metrics(
    running: RunningServer, *, host: str, port: int, service_name: str
) -> MetricsServer | None:
    """Serve /metrics next to a running gRPC server when ``port`` >= 0.

    The port and URL go into the service's ready file (``metrics_port``,
    ``metrics_url``); the endpoint stays up through the drain, so the last
    scrape still sees the shutdown, and closes after it.
    """
    if port < 0:
        return None
    server = start_metrics_server(host, port, service_name)
    running.ready_info.update(metrics_port=server.port, metrics_url=server.url)

    async def stop() -> None:
        await asyncio.to_thread(server.stop)

    running.after_drain.append(stop)
    log.info("%s metrics on %s", service_name, server.url)
    return server


ObservationSource = Callable[[], Iterable[Observation]]


class ObservedGauge:
    """An observable gauge whose sources are attached at run time and detached on stop.

    OpenTelemetry cannot unregister a callback, and a process (a test) may start
    the same service more than once; the gauge is created once and reads whatever
    sources are attached when Prometheus scrapes. Sources run on the scrape's
    thread, so they must be thread safe (a SQLAlchemy engine is).
    """

    def __init__(self, meter_name: str, name: str, *, unit: str, description: str) -> None:
        self._sources: list[ObservationSource] = []
        self._lock = threading.Lock()
        metrics.get_meter(meter_name).create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def attach(self, source: ObservationSource) -> Callable[[], None]:
        """Start reporting ``source``; returns the function that stops it."""
        with self._lock:
            self._sources.append(source)

        def detach() -> None:
            with self._lock:
                if source in self._sources:
                    self._sources.remove(source)

        return detach

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._sources)
        found: list[Observation] = []
        for source in sources:
            try:
                found.extend(source())
            except Exception:
                # A failed read (e.g. the database is gone) must not break the whole scrape.
                log.warning("metrics source %r failed", source, exc_info=True)
        return found
