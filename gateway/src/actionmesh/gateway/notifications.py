"""Notifications: which audit events go to which tenant's webhooks, and in what form.

Subscriptions come from configuration (``notifications_file``, JSON)::

    {"subscriptions": [
      {"id": "desk-approvals", "tenant": "acme",
       "url": "https://hooks.example.com/actionmesh",
       "events": ["approval.requested", "execution.partial"],
       "secret_file": "desk-approvals.secret"}
    ]}

``events`` names :class:`NotificationType` values (``["*"]`` or absent: all of them);
``secret_file`` is read at start (relative paths from the notifications file's folder;
at least 16 bytes, or ``whsec_<base64>``). A notification is a CloudEvents 1.0
structured JSON body, built once when its audit event is written (retries send the
same bytes) and never carrying inputs: not the values, not even the digests of a
sensitive record's inputs, and no message for a sensitive record (a person's comment
or a provider's text may quote a value). The CloudEvents ``id`` is the audit event's
id, so a receiver dedupes retries by it.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from actionmesh.client.webhooks import secret_bytes
from actionmesh.rpc.convert import from_timestamp
from actionmesh.rpc.identifiers import TENANT
from actionmesh.rpc.server import CannotStart
from actionmesh.v1 import audit_pb2, common_pb2

log = logging.getLogger(__name__)

TYPE_PREFIX = "dev.actionmesh."
MIN_SECRET_BYTES = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_E = audit_pb2.AuditEventType


class NotificationType(enum.StrEnum):
    """What a subscription can ask for; the CloudEvents type is ``dev.actionmesh.<value>``."""

    APPROVAL_REQUESTED = "approval.requested"
    APPROVAL_GRANTED = "approval.granted"
    APPROVAL_REJECTED = "approval.rejected"
    APPROVAL_EXPIRED = "approval.expired"
    EXECUTION_PARTIAL = "execution.partial"
    """An execution ended PARTIAL."""
    EXECUTION_TIMED_OUT = "execution.timed_out"
    """An execution ended TIMED_OUT (its deadline, an orphan, a maximum duration)."""
    EXECUTION_NEEDS_ATTENTION = "execution.needs_attention"
    """The gateway cannot find out what became of an execution: a person must."""
    EXECUTION_RECONCILED = "execution.reconciled"
    """An unsettled execution's outcome became known (asked, or resolved by a person)."""

    @property
    def cloud_type(self) -> str:
        return TYPE_PREFIX + self.value


class NotificationState(enum.StrEnum):
    """Where one delivery (one event to one subscription) stands."""

    PENDING = "PENDING"
    """Not delivered yet: due at its next attempt."""
    DELIVERED = "DELIVERED"
    """The receiver answered 2xx."""
    FAILED = "FAILED"
    """Given up: too many attempts, too old, or its subscription is gone."""


_BY_AUDIT_TYPE = {
    _E.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED: NotificationType.APPROVAL_REQUESTED,
    _E.AUDIT_EVENT_TYPE_APPROVAL_GRANTED: NotificationType.APPROVAL_GRANTED,
    _E.AUDIT_EVENT_TYPE_APPROVAL_REJECTED: NotificationType.APPROVAL_REJECTED,
    _E.AUDIT_EVENT_TYPE_APPROVAL_EXPIRED: NotificationType.APPROVAL_EXPIRED,
    _E.AUDIT_EVENT_TYPE_EXECUTION_NEEDS_ATTENTION: NotificationType.EXECUTION_NEEDS_ATTENTION,
    _E.AUDIT_EVENT_TYPE_EXECUTION_RECONCILED: NotificationType.EXECUTION_RECONCILED,
}
_BY_FINAL_OUTCOME = {
    common_pb2.OUTCOME_PARTIAL: NotificationType.EXECUTION_PARTIAL,
    common_pb2.OUTCOME_TIMED_OUT: NotificationType.EXECUTION_TIMED_OUT,
}


def notification_type(event: audit_pb2.AuditEvent) -> NotificationType | None:
    """The notification an audit event makes, or None (most make none)."""
    if event.type == _E.AUDIT_EVENT_TYPE_EXECUTION_FINISHED:
        return _BY_FINAL_OUTCOME.get(event.outcome)
    return _BY_AUDIT_TYPE.get(event.type)


@dataclass(frozen=True)
class Subscription:
    """One tenant's webhook and the notifications it wants."""

    id: str
    tenant: str
    url: str
    events: frozenset[NotificationType]
    secret: bytes

    def wants(self, event: audit_pb2.AuditEvent, kind: NotificationType) -> bool:
        return event.tenant == self.tenant and kind in self.events


class NotificationConfigError(CannotStart, ValueError):
    """The notifications file is invalid; the message names the entry and field."""


def load_subscriptions(path: str) -> tuple[Subscription, ...]:
    """Read and check ``path`` (empty: no subscriptions)."""
    if not path:
        return ()
    file = Path(path)
    try:
        document = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise NotificationConfigError(f"notifications_file {path}: {exc}") from exc
    entries = document.get("subscriptions") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise NotificationConfigError(
            f'notifications_file {path}: expected {{"subscriptions": [...]}}'
        )
    subscriptions: list[Subscription] = []
    for index, entry in enumerate(entries):
        subscription = _subscription(file, index, entry)
        if any(s.id == subscription.id for s in subscriptions):
            raise NotificationConfigError(
                f"notifications_file {path}: subscription id {subscription.id!r} is used twice"
            )
        subscriptions.append(subscription)
    return tuple(subscriptions)


def _subscription(file: Path, index: int, entry: object) -> Subscription:
    where = f"notifications_file {file}: subscriptions[{index}]"
    if not isinstance(entry, dict):
        raise NotificationConfigError(f"{where} is not an object")
    unknown = sorted(set(entry) - {"id", "tenant", "url", "events", "secret_file"})
    if unknown:
        raise NotificationConfigError(f"{where}: unknown fields {unknown}")
    sub_id, tenant, url = (entry.get(k) for k in ("id", "tenant", "url"))
    if not isinstance(sub_id, str) or not TENANT.valid(sub_id):
        raise NotificationConfigError(f"{where}.id {TENANT.describe()}")
    if not isinstance(tenant, str) or not TENANT.valid(tenant):
        raise NotificationConfigError(f"{where}.tenant {TENANT.describe()}")
    parts = urlsplit(url) if isinstance(url, str) else None
    if (
        parts is None
        or not parts.hostname
        or not (
            parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS)
        )
    ):
        raise NotificationConfigError(
            f"{where}.url must be an https URL (plain http only for 127.0.0.1/localhost)"
        )
    names = entry.get("events", ["*"])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise NotificationConfigError(f"{where}.events must be a list of event names")
    if "*" in names:
        events = frozenset(NotificationType)
    else:
        known = {t.value: t for t in NotificationType}
        bad = sorted(n for n in names if n not in known)
        if bad or not names:
            raise NotificationConfigError(
                f"{where}.events: unknown {bad or 'empty list'}; one of {sorted(known)} or '*'"
            )
        events = frozenset(known[n] for n in names)
    secret_file = entry.get("secret_file")
    if not isinstance(secret_file, str) or not secret_file:
        raise NotificationConfigError(f"{where}.secret_file is required")
    secret_path = Path(secret_file)
    if not secret_path.is_absolute():
        secret_path = file.parent / secret_path
    try:
        secret = secret_bytes(secret_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise NotificationConfigError(f"{where}.secret_file: {exc}") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise NotificationConfigError(
            f"{where}.secret_file holds {len(secret)} bytes; at least {MIN_SECRET_BYTES}"
        )
    return Subscription(id=sub_id, tenant=tenant, url=str(url), events=events, secret=secret)


def _outcome_name(outcome: int) -> str:
    if outcome == common_pb2.OUTCOME_UNSPECIFIED:
        return ""
    return common_pb2.Outcome.Name(outcome).removeprefix("OUTCOME_")  # type: ignore[arg-type]


def cloud_event(event: audit_pb2.AuditEvent, kind: NotificationType) -> dict[str, Any]:
    """The CloudEvent (structured JSON) of one audit event: never any inputs."""
    sensitive = event.inputs_redacted
    data: dict[str, Any] = {
        "tenant": event.tenant,
        "execution_id": event.execution_id,
        "action_id": event.action_id,
        "provider_id": event.provider_id,
        "record": {"type": event.record.type, "id": event.record.id},
        "actor": event.actor,
        "outcome": _outcome_name(event.outcome),
        "reason": event.reason,
        "sensitive": sensitive,
        "trace_id": event.trace_id,
    }
    if event.told_outcome:
        data["told_outcome"] = _outcome_name(event.told_outcome)
    if event.external_ref:
        data["external_ref"] = event.external_ref
    if event.message and not sensitive:
        data["message"] = event.message
    if kind.value.startswith("approval."):
        data["approval"] = {
            "state": kind.value.removeprefix("approval.").upper(),
            # The requester for a request, the approver for a decision.
            "by": event.actor,
        }
    return {
        "specversion": "1.0",
        "id": event.event_id,
        "source": f"/actionmesh/tenants/{event.tenant}",
        "type": kind.cloud_type,
        "subject": f"executions/{event.execution_id}",
        "time": from_timestamp(event.occurred_at).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


class NotificationRouter:
    """Turns audit events into notification outbox rows for the subscriptions that want
    them: pure computation, no I/O, run inside the ledger's write transaction."""

    def __init__(self, subscriptions: Sequence[Subscription], *, path: str = "") -> None:
        self.path = path
        self.reload_error = ""
        self._set(subscriptions)

    @classmethod
    def from_file(cls, path: str) -> NotificationRouter:
        """The subscriptions of ``path`` (NotificationConfigError when it is invalid)."""
        return cls(load_subscriptions(path), path=path)

    def _set(self, subscriptions: Sequence[Subscription]) -> None:
        # One attribute each, replaced whole: readers on other threads see the old set
        # or the new one, never a mix.
        self._by_id = {s.id: s for s in subscriptions}
        self.subscriptions = tuple(subscriptions)

    def get(self, subscription_id: str) -> Subscription | None:
        return self._by_id.get(subscription_id)

    def reload_if_changed(self) -> bool | None:
        """Read the file (and its secret files) again: True when the subscriptions
        changed and were loaded, None when nothing changed, False when the file is now
        invalid (the previous subscriptions stay; ``reload_error`` says why)."""
        if not self.path:
            return None
        try:
            fresh = load_subscriptions(self.path)
        except NotificationConfigError as exc:
            if str(exc) != self.reload_error:
                log.error("notifications file refused, the previous one stays: %s", exc)
            self.reload_error = str(exc)
            return False
        self.reload_error = ""
        if fresh == self.subscriptions:
            return None
        self._set(fresh)
        log.info("notifications file reloaded: %d subscriptions", len(fresh))
        return True

    def rows(self, events: Sequence[audit_pb2.AuditEvent], now: datetime) -> list[dict[str, Any]]:
        """One outbox row per (event, subscription that wants it). Never raises: a
        notification that cannot be built is logged and left out, never the write."""
        rows: list[dict[str, Any]] = []
        if not self.subscriptions:
            return rows
        for event in events:
            try:
                kind = notification_type(event)
                if kind is None:
                    continue
                wanting = [s for s in self.subscriptions if s.wants(event, kind)]
                if not wanting:
                    continue
                body = json.dumps(cloud_event(event, kind), separators=(",", ":")).encode()
            except Exception:  # a notification is never worth failing the execution
                log.exception("could not build the notification of event %s", event.event_id)
                continue
            rows.extend(
                {
                    "subscription_id": s.id,
                    "tenant": event.tenant,
                    "event_id": event.event_id,
                    "event_type": kind.value,
                    "execution_id": event.execution_id,
                    "payload": body,
                    "state": NotificationState.PENDING.value,
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                }
                for s in wanting
            )
        return rows


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try at delivering a notification."""

    attempt: int
    at: datetime
    status_code: int
    """The receiver's HTTP status; 0 when there was no answer (refused, timed out)."""
    error: str
    delivered: bool


@dataclass(frozen=True)
class Delivery:
    """One notification to one subscription, as the delivery log shows it."""

    id: int
    subscription_id: str
    tenant: str
    event_id: str
    event_type: str
    execution_id: str
    payload: bytes
    state: NotificationState
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_attempt_at: datetime | None
    last_status_code: int
    last_error: str
    delivered_at: datetime | None
