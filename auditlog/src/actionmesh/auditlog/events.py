"""Audit log domain rules: what an acceptable event is, batch limits and timeline paging.

The ``AuditEvent`` message of the contract is the domain value here: the log
stores exactly what the gateway sent, so a parallel Python model would only add
a lossy copy. :class:`AuditLog` is the async face of the store that servicers
(and later the gateway's tooling) call; it runs the synchronous repository in a
worker thread so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from actionmesh.auditlog import storage
from actionmesh.auditlog.chain import Verification
from actionmesh.auditlog.storage import AppendResult, AuditRepository, SummaryFilter
from actionmesh.rpc.convert import from_timestamp
from actionmesh.rpc.errors import FieldViolation, InvalidArgument
from actionmesh.v1 import audit_pb2, common_pb2

MAX_EVENTS_PER_APPEND = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
# A page is cut short before its events could exceed the default 4 MiB gRPC
# message limit; page_size is an upper bound, and the token says where to go on.
MAX_PAGE_BYTES = 3 * 1024 * 1024
# Violations travel in a trailer, and gRPC refuses trailers over 8 KiB by default:
# a batch of 1000 broken events must still produce a readable error.
MAX_REPORTED_VIOLATIONS = 25

_TOKEN_PREFIX = "v1:"
_TOKEN_PATTERN = re.compile(r"v1:([1-9][0-9]{0,18})")
_MAX_TOKEN_CHARS = 64
TRACE_ID = re.compile(r"[0-9a-f]{32}")

# (path below the event, max characters, required): the bounded, indexed columns.
_STRING_FIELDS: tuple[tuple[str, int, bool], ...] = (
    ("event_id", storage.EVENT_ID_MAX, True),
    ("tenant", storage.TENANT_MAX, True),
    ("record.type", storage.RECORD_TYPE_MAX, True),
    ("record.id", storage.RECORD_ID_MAX, True),
    ("execution_id", storage.EXECUTION_ID_MAX, False),
    ("trace_id", storage.TRACE_ID_MAX, False),
)


def _string_at(event: audit_pb2.AuditEvent, path: str) -> str:
    if path == "record.type":
        return event.record.type
    if path == "record.id":
        return event.record.id
    value: str = getattr(event, path)
    return value


def event_violations(event: audit_pb2.AuditEvent, prefix: str = "") -> list[FieldViolation]:
    """Everything wrong with one event, with field paths below ``prefix``."""
    violations: list[FieldViolation] = []
    for path, limit, required in _STRING_FIELDS:
        value = _string_at(event, path)
        if required and not value:
            violations.append(FieldViolation(prefix + path, "must not be empty"))
        elif len(value) > limit:
            violations.append(FieldViolation(prefix + path, f"must be at most {limit} characters"))
    if event.type == audit_pb2.AUDIT_EVENT_TYPE_UNSPECIFIED:
        violations.append(FieldViolation(prefix + "type", "must be set"))
    elif event.type not in audit_pb2.AuditEventType.values():
        violations.append(FieldViolation(prefix + "type", f"unknown event type {event.type}"))
    if event.outcome not in common_pb2.Outcome.values():
        violations.append(FieldViolation(prefix + "outcome", f"unknown outcome {event.outcome}"))
    return violations


def validate_events(events: Sequence[audit_pb2.AuditEvent]) -> None:
    """Raise InvalidArgument unless the whole batch may be stored."""
    if len(events) > MAX_EVENTS_PER_APPEND:
        raise InvalidArgument(
            f"at most {MAX_EVENTS_PER_APPEND} events per call, got {len(events)}",
            reason="TOO_MANY_EVENTS",
            violations=[
                FieldViolation("events", f"at most {MAX_EVENTS_PER_APPEND} events per call")
            ],
        )
    violations: list[FieldViolation] = []
    invalid_events = 0
    for index, event in enumerate(events):
        found = event_violations(event, prefix=f"events[{index}].")
        if found:
            invalid_events += 1
            violations.extend(found)
    if not violations:
        return
    message = f"{invalid_events} of {len(events)} events are invalid; nothing was stored"
    if len(violations) > MAX_REPORTED_VIOLATIONS:
        message += f" (first {MAX_REPORTED_VIOLATIONS} of {len(violations)} problems listed)"
    raise InvalidArgument(
        message, reason="INVALID_EVENT", violations=violations[:MAX_REPORTED_VIOLATIONS]
    )


def effective_page_size(requested: int) -> int:
    """0 means the default; anything above the maximum is clamped, not refused."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(last_sequence: int) -> str:
    """An opaque token for "the events after this position"."""
    raw = f"{_TOKEN_PREFIX}{last_sequence}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str) -> int:
    """The position a token stands for; 0 (the start) for an empty token."""
    if not token:
        return 0
    try:
        if len(token) > _MAX_TOKEN_CHARS:
            raise ValueError("too long")
        padded = token + "=" * (-len(token) % 4)
        # validate=True: the lenient default would silently drop foreign characters.
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        match = _TOKEN_PATTERN.fullmatch(raw.decode("ascii"))
        if match is None:
            raise ValueError("unknown token format")
        return int(match.group(1))
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise InvalidArgument(
            "page_token is not a token returned by ListTimeline",
            reason="INVALID_PAGE_TOKEN",
            violations=[FieldViolation("page_token", "malformed page token")],
        ) from exc


@dataclass(frozen=True)
class TimelinePage:
    """One page of a record's timeline; ``next_page_token`` is empty on the last page."""

    events: list[audit_pb2.AuditEvent]
    next_page_token: str


def _require(fields: Sequence[tuple[str, str]], reason: str) -> None:
    missing = [FieldViolation(name, "must not be empty") for name, value in fields if not value]
    if missing:
        raise InvalidArgument(
            "missing required fields: " + ", ".join(v.field for v in missing),
            reason=reason,
            violations=missing,
        )


class AuditLog:
    """The audit log's operations: append batches and read tenant-scoped histories."""

    def __init__(self, repository: AuditRepository) -> None:
        self._repository = repository

    @property
    def repository(self) -> AuditRepository:
        return self._repository

    async def append(self, events: Sequence[audit_pb2.AuditEvent]) -> AppendResult:
        """Validate the whole batch, then store it at most once per event id."""
        validate_events(events)
        if not events:
            return AppendResult(stored=0, duplicates=0)
        return await asyncio.to_thread(self._repository.append, list(events))

    async def timeline(
        self,
        tenant: str,
        record_type: str,
        record_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        types: Sequence[int] = (),
    ) -> TimelinePage:
        """One page of a record's events in store order, for one tenant only."""
        _require(
            [("tenant", tenant), ("record.type", record_type), ("record.id", record_id)],
            reason="INVALID_TIMELINE_REQUEST",
        )
        unknown = [t for t in types if t not in audit_pb2.AuditEventType.values()]
        if unknown or audit_pb2.AUDIT_EVENT_TYPE_UNSPECIFIED in types:
            raise InvalidArgument(
                "unknown event type in the filter",
                reason="INVALID_TIMELINE_REQUEST",
                violations=[FieldViolation("types", f"unknown event types {sorted(set(unknown))}")],
            )
        after = decode_page_token(page_token)
        size = effective_page_size(page_size)
        # One extra row tells whether another page exists without a second query.
        rows = await asyncio.to_thread(
            self._repository.timeline,
            tenant,
            record_type,
            record_id,
            after_sequence=after,
            limit=size + 1,
            types=[audit_pb2.AuditEventType.Name(t) for t in types],  # type: ignore[arg-type]
        )
        return _page(rows, size)

    async def summaries(
        self, request: audit_pb2.ListExecutionSummariesRequest
    ) -> audit_pb2.ListExecutionSummariesResponse:
        """One page of a tenant's executions, newest first, narrowed by the request."""
        where = summary_filter(request)
        before = decode_page_token(request.page_token)
        size = effective_page_size(request.page_size)
        rows = await asyncio.to_thread(
            self._repository.list_summaries,
            request.tenant,
            where,
            before_sequence=before,
            limit=size + 1,
        )
        response = audit_pb2.ListExecutionSummariesResponse(
            executions=[summary for _, summary in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = encode_page_token(rows[size - 1][0])
        return response

    async def trace(
        self, tenant: str, trace_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> TimelinePage:
        """One page of the events carrying a trace id, for one tenant, in store order."""
        _require([("tenant", tenant), ("trace_id", trace_id)], reason="INVALID_TRACE_QUERY")
        if not TRACE_ID.fullmatch(trace_id):
            raise InvalidArgument(
                "trace_id must be 32 lowercase hex digits",
                reason="INVALID_TRACE_QUERY",
                violations=[FieldViolation("trace_id", "must be 32 lowercase hex digits")],
            )
        after = decode_page_token(page_token)
        size = effective_page_size(page_size)
        rows = await asyncio.to_thread(
            self._repository.list_by_trace, tenant, trace_id, after_sequence=after, limit=size + 1
        )
        return _page(rows, size)

    async def verify_chain(self, tenant: str) -> list[Verification]:
        """Verify one tenant's chain, or every tenant's when ``tenant`` is empty."""
        if len(tenant) > storage.TENANT_MAX:
            raise InvalidArgument(
                "tenant is too long",
                reason="INVALID_CHAIN_QUERY",
                violations=[FieldViolation("tenant", f"at most {storage.TENANT_MAX} characters")],
            )
        tenants = [tenant] if tenant else await asyncio.to_thread(self._repository.chain_tenants)
        return [await asyncio.to_thread(self._repository.verify_chain, name) for name in tenants]


def _page(rows: list[audit_pb2.AuditEvent], size: int) -> TimelinePage:
    """Cut ``rows`` (fetched with one extra) into a page that fits a gRPC message."""
    more = len(rows) > size
    events: list[audit_pb2.AuditEvent] = []
    total_bytes = 0
    for event in rows[:size]:
        event_bytes = event.ByteSize()
        if events and total_bytes + event_bytes > MAX_PAGE_BYTES:
            more = True
            break
        events.append(event)
        total_bytes += event_bytes
    next_token = encode_page_token(events[-1].sequence) if more and events else ""
    return TimelinePage(events=events, next_page_token=next_token)


def summary_filter(request: audit_pb2.ListExecutionSummariesRequest) -> SummaryFilter:
    """The request's filters, validated: bad values are named, never ignored."""
    violations: list[FieldViolation] = []
    if not request.tenant:
        violations.append(FieldViolation("tenant", "must not be empty"))
    for name, value, limit in (
        ("tenant", request.tenant, storage.TENANT_MAX),
        ("actor", request.actor, storage.ACTOR_MAX),
        ("action_id", request.action_id, storage.ACTOR_MAX),
        ("record.type", request.record.type, storage.RECORD_TYPE_MAX),
        ("record.id", request.record.id, storage.RECORD_ID_MAX),
    ):
        if len(value) > limit:
            violations.append(FieldViolation(name, f"must be at most {limit} characters"))
    if bool(request.record.type) != bool(request.record.id):
        violations.append(FieldViolation("record", "give both type and id, or neither"))
    known = common_pb2.Outcome.values()
    for index, outcome in enumerate(request.outcomes):
        if outcome not in known or outcome == common_pb2.OUTCOME_UNSPECIFIED:
            violations.append(FieldViolation(f"outcomes[{index}]", f"unknown outcome {outcome}"))
    after = from_timestamp(request.started_after) if request.HasField("started_after") else None
    before = from_timestamp(request.started_before) if request.HasField("started_before") else None
    if after is not None and before is not None and after >= before:
        violations.append(FieldViolation("started_before", "must be later than started_after"))
    if violations:
        raise InvalidArgument(
            "invalid execution query: " + ", ".join(v.field for v in violations),
            reason="INVALID_EXECUTION_QUERY",
            violations=violations,
        )
    return SummaryFilter(
        actor=request.actor,
        action_id=request.action_id,
        outcomes=tuple(common_pb2.Outcome.Name(o) for o in request.outcomes),
        record_type=request.record.type,
        record_id=request.record.id,
        started_after=after,
        started_before=before,
    )
