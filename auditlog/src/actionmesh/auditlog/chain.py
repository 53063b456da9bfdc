"""The per-tenant hash chain that makes the audit trail tamper-evident.

Every stored event gets the next index of its tenant's chain and a hash that
covers the previous event's hash, so changing, removing or reordering any
stored event breaks a link that :func:`verify_links` names. The encoding is
deliberately simple so that an auditor can recompute it without our code::

    SHA-256( b"actionmesh.audit.chain.v1"
             || uint32_be(len(tenant_utf8)) || tenant_utf8
             || uint64_be(chain_index)
             || prev_hash (32 raw bytes; all zero for the first event)
             || stored_event_bytes )

``stored_event_bytes`` are the bytes the audit log keeps: the ``AuditEvent``
with ``sequence`` and the chain fields cleared, serialized deterministically.
The hash is over those stored bytes, never over a re-serialization, so a
protobuf upgrade cannot break old chains.

The chain detects edits by anyone who cannot also rewrite every later hash and
the chain head. Somebody with full write access to the database can rebuild the
whole chain; recording the head (``VerifyChain`` returns it) somewhere else,
e.g. in a ticket or a signed report, is what catches that.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from actionmesh.v1 import audit_pb2, common_pb2

DOMAIN = b"actionmesh.audit.chain.v1"
GENESIS_HASH = "0" * 64


def link_hash(tenant: str, chain_index: int, prev_hash: str, stored_bytes: bytes) -> str:
    """The hex hash of one link (see the module docstring for the encoding)."""
    tenant_bytes = tenant.encode("utf-8")
    digest = hashlib.sha256()
    digest.update(DOMAIN)
    digest.update(struct.pack(">I", len(tenant_bytes)))
    digest.update(tenant_bytes)
    digest.update(struct.pack(">Q", chain_index))
    digest.update(bytes.fromhex(prev_hash))
    digest.update(stored_bytes)
    return digest.hexdigest()


def stored_bytes(event: audit_pb2.AuditEvent) -> bytes:
    """What the store keeps of an event: positions assigned by the store are cleared."""
    evidence = audit_pb2.AuditEvent()
    evidence.CopyFrom(event)
    for name in ("sequence", "chain_index", "prev_chain_hash", "chain_hash"):
        evidence.ClearField(name)
    return evidence.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class StoredLink:
    """One stored event as verification sees it: the row's columns and its bytes."""

    sequence: int
    event_id: str
    tenant: str
    chain_index: int
    prev_hash: str
    chain_hash: str
    payload: bytes
    # The indexed columns, which queries filter on, must agree with the evidence.
    columns: dict[str, str]


@dataclass(frozen=True)
class Break:
    """The first link that does not hold, and why."""

    chain_index: int
    sequence: int
    event_id: str
    problem: str


@dataclass(frozen=True)
class Verification:
    """The result of walking one tenant's chain."""

    tenant: str
    events_checked: int
    head_index: int
    head_hash: str
    first_break: Break | None

    @property
    def intact(self) -> bool:
        return self.first_break is None


def indexed_columns(event: audit_pb2.AuditEvent) -> dict[str, str]:
    """The values the store's indexed columns must hold for this event."""
    return {
        "event_id": event.event_id,
        "tenant": event.tenant,
        "record_type": event.record.type,
        "record_id": event.record.id,
        "execution_id": event.execution_id,
        "action_id": event.action_id,
        "actor": event.actor,
        "type": audit_pb2.AuditEventType.Name(event.type),
        "outcome": common_pb2.Outcome.Name(event.outcome),
        "trace_id": event.trace_id,
    }


def _column_mismatch(link: StoredLink) -> str | None:
    try:
        event = audit_pb2.AuditEvent.FromString(link.payload)
        expected = indexed_columns(event)
    except Exception:  # a payload that no longer parses is itself the finding
        return "the stored event no longer parses"
    for name, value in expected.items():
        if link.columns.get(name, value) != value:
            return f"column {name!r} disagrees with the stored event (changed after it was stored)"
    return None


def verify_links(
    tenant: str, links: Iterable[StoredLink], *, head_index: int, head_hash: str
) -> Verification:
    """Walk a tenant's links in chain order and report the first that does not hold.

    ``head_index``/``head_hash`` are what the store recorded as the chain's end,
    so removing the newest events is detected too.
    """
    expected_index = 1
    prev_hash = GENESIS_HASH
    checked = 0
    for link in links:
        found = _first_problem(tenant, link, expected_index, prev_hash)
        if found is not None:
            return Verification(tenant, checked, head_index, head_hash, found)
        checked += 1
        expected_index += 1
        prev_hash = link.chain_hash
    last_index = expected_index - 1
    if last_index != head_index:
        problem = (
            f"the chain head says {head_index} events but {last_index} are stored: "
            "events at the end were removed"
            if head_index > last_index
            else f"{last_index} events are stored but the chain head says {head_index}"
        )
        failure = Break(last_index + 1 if head_index > last_index else head_index, 0, "", problem)
        return Verification(tenant, checked, head_index, head_hash, failure)
    if prev_hash != head_hash:
        failure = Break(last_index, 0, "", "the last event's hash differs from the chain head")
        return Verification(tenant, checked, head_index, head_hash, failure)
    return Verification(tenant, checked, head_index, head_hash, None)


def _first_problem(
    tenant: str, link: StoredLink, expected_index: int, prev_hash: str
) -> Break | None:
    def broken(problem: str, index: int | None = None) -> Break:
        return Break(
            index if index is not None else link.chain_index,
            link.sequence,
            link.event_id,
            problem,
        )

    if link.chain_index != expected_index:
        if link.chain_index > expected_index:
            missing = f"the event at chain index {expected_index} is missing"
            return Break(expected_index, 0, "", missing)
        return broken(f"chain index {link.chain_index} appears twice or out of order")
    if link.tenant != tenant:
        return broken(f"the event belongs to tenant {link.tenant!r}, not to this chain")
    if link.prev_hash != prev_hash:
        return broken("the link to the previous event is broken (its hash does not match)")
    if link_hash(tenant, link.chain_index, prev_hash, link.payload) != link.chain_hash:
        return broken("hash mismatch: the event was changed after it was stored")
    mismatch = _column_mismatch(link)
    if mismatch is not None:
        return broken(mismatch)
    return None


def chain(
    tenant: str, start_index: int, prev_hash: str, payloads: Iterable[bytes]
) -> Iterator[tuple[int, str, str]]:
    """(index, prev hash, hash) for payloads appended after ``start_index``."""
    index = start_index
    for payload in payloads:
        index += 1
        current = link_hash(tenant, index, prev_hash, payload)
        yield index, prev_hash, current
        prev_hash = current
