"""The gateway's metrics: executions, latencies, outbox depth and provider health.

The instruments are cheap no-ops until ``metrics_port`` turns metrics on (see
:mod:`actionmesh.runtime.metrics`); the domain code calls the two ``record_*``
functions, and :func:`observe_gateway` attaches the gauges to a running gateway.
``gateway.server`` exposes them with ``expose_metrics`` when ``metrics_port`` >= 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import Observation

from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.notifications import NotificationState
from actionmesh.gateway.storage import GatewayStore
from actionmesh.rpc.server import RunningServer
from actionmesh.runtime.metrics import LATENCY_BUCKETS_S, ObservedGauge
from actionmesh.v1 import registry_pb2

METER = "actionmesh.gateway"
_meter = metrics.get_meter(METER)

EXECUTIONS = _meter.create_counter(
    "actionmesh.executions",
    unit="{execution}",
    description="Finished execution attempts by action, provider and outcome, "
    "including the ones the gateway refused (DENIED, UNAVAILABLE).",
)
EXECUTION_DURATION = _meter.create_histogram(
    "actionmesh.execution.duration",
    unit="s",
    description="Time from dispatch to the provider's answer (or the deadline), by action "
    "and outcome.",
    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
)
DISCOVER_DURATION = _meter.create_histogram(
    "actionmesh.discover.duration",
    unit="s",
    description="Time of a DiscoverActions fan-out (policy, providers, evidence), by record "
    "type and whether a provider was degraded.",
    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
)
ADMISSION_REFUSED = _meter.create_counter(
    "actionmesh.admission.refused",
    unit="{call}",
    description="Calls refused by a tenant rate or a tenant/provider concurrency limit, by reason.",
)
RECONCILED = _meter.create_counter(
    "actionmesh.executions.reconciled",
    unit="{execution}",
    description="Unsettled executions (TIMED_OUT, PARTIAL DOWNSTREAM_OUTCOME_UNKNOWN) whose "
    "outcome the reconciler settled, by provider, told and resolved outcome; resolved "
    "NEEDS_ATTENTION when it gave up and a person must find out.",
)
OUTBOX_DEPTH = ObservedGauge(
    METER,
    "actionmesh.audit.outbox.depth",
    unit="{event}",
    description="Audit events written by the gateway and not yet acknowledged by the audit log.",
)
UNRESOLVED = ObservedGauge(
    METER,
    "actionmesh.executions.unresolved",
    unit="{execution}",
    description="Executions whose outcome still needs an answer, by reconcile state: PENDING "
    "(the reconciler asks the provider) and NEEDS_ATTENTION (a person must find out).",
)
NOTIFICATIONS = ObservedGauge(
    METER,
    "actionmesh.notifications",
    unit="{notification}",
    description="Webhook notifications in the gateway's outbox (its delivery log), by state: "
    "PENDING (not delivered yet), DELIVERED, FAILED (given up).",
)
PROVIDER_HEALTHY = ObservedGauge(
    METER,
    "actionmesh.provider.healthy",
    unit="1",
    description="1 while the registry reports the provider SERVING to this gateway, else 0.",
)


def record_execution(
    action_id: str, provider_id: str, outcome: str, duration_s: float | None = None
) -> None:
    """Count one finished attempt; ``duration_s`` for the ones that were dispatched."""
    EXECUTIONS.add(1, {"action_id": action_id, "provider_id": provider_id, "outcome": outcome})
    if duration_s is not None:
        EXECUTION_DURATION.record(
            max(duration_s, 0.0), {"action_id": action_id, "outcome": outcome}
        )


def record_reconciled(provider_id: str, told: str, resolved: str) -> None:
    """Count one settled execution (``resolved`` NEEDS_ATTENTION when nobody could say)."""
    RECONCILED.add(1, {"provider_id": provider_id, "told": told, "resolved": resolved})


def record_admission_refused(reason: str) -> None:
    ADMISSION_REFUSED.add(1, {"reason": reason})


def record_discover(record_type: str, duration_s: float, degraded: bool) -> None:
    DISCOVER_DURATION.record(
        duration_s, {"record_type": record_type, "degraded": "true" if degraded else "false"}
    )


def observe_gateway(
    running: RunningServer, store: GatewayStore, directory: ProviderDirectory
) -> None:
    """Report this gateway's outbox depth and provider view until it stops."""

    def depth() -> Iterable[Observation]:
        return [Observation(store.outbox_depth())]

    def unresolved() -> Iterable[Observation]:
        counts = store.unresolved_counts()
        return [
            Observation(counts.get(state, 0), {"state": state})
            for state in ("PENDING", "NEEDS_ATTENTION")
        ]

    def providers() -> Iterable[Observation]:
        # The directory replaces or updates this dict on the event loop; copying
        # its values is a single C-level step, safe from the scrape's thread.
        entries = directory.entries()
        return [
            Observation(
                1 if e.registration.health == registry_pb2.PROVIDER_HEALTH_SERVING else 0,
                {"provider_id": e.provider_id},
            )
            for e in entries
        ]

    detach_depth = OUTBOX_DEPTH.attach(depth)
    detach_providers = PROVIDER_HEALTHY.attach(providers)
    detach_unresolved = UNRESOLVED.attach(unresolved)

    def notifications() -> Iterable[Observation]:
        counts = store.notification_counts()
        return [
            Observation(counts.get(state.value, 0), {"state": state.value})
            for state in NotificationState
        ]

    detach_notifications = NOTIFICATIONS.attach(notifications)

    async def detach() -> None:
        # Before the store closes after the drain: a scrape must not query a closed store.
        detach_depth()
        detach_providers()
        detach_unresolved()
        detach_notifications()

    running.on_stop.append(detach)
