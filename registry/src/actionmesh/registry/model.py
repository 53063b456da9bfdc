"""The registry's domain vocabulary: registrations, providers, leases, owners and changes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from actionmesh.v1 import common_pb2

ANONYMOUS = "anonymous"
"""The owner identity of registrations made without any credential (one, shared)."""


class Health(enum.StrEnum):
    """What the last grpc.health.v1 check of a provider said."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"


@dataclass(frozen=True)
class Registration:
    """What a provider asks to be registered as."""

    provider_id: str
    endpoint: str
    version: str
    # The contract's ActionDescriptor is already the domain's description of an
    # action; copying it into a parallel dataclass would only add drift.
    actions: tuple[common_pb2.ActionDescriptor, ...]
    record_sources: tuple[str, ...] = ()
    """Record types this provider is the system of record of (one source per type)."""


@dataclass(frozen=True)
class Provider:
    """A registered provider as stored."""

    provider_id: str
    endpoint: str
    version: str
    actions: tuple[common_pb2.ActionDescriptor, ...]
    lease_id: str
    lease_expires_at: datetime
    registered_at: datetime
    health: Health
    record_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lease:
    """Handed to a provider on registration; it must renew before ``expires_at``."""

    lease_id: str
    ttl: timedelta
    expires_at: datetime


class ChangeType(enum.Enum):
    UPSERTED = "upserted"
    REMOVED = "removed"


@dataclass(frozen=True)
class Change:
    """One event a watcher sees after its snapshot."""

    type: ChangeType
    provider: Provider


@dataclass(frozen=True)
class Ownership:
    """Which credential identity a provider id is bound to (see registry.credentials)."""

    provider_id: str
    owner: str
    bound_at: datetime
