"""The support platform's REST contract: strict validation of requests, JSON errors.

``POST /v1/escalations`` takes::

    {
      "tenant": "acme",
      "source": {"type": "ticket", "id": "T-1001", "status": "open"},
      "summary": "Customer cannot log in since the SSO change",
      "severity": "high",                     # low | medium | high | critical
      "target_queue": "identity",             # optional; default "general"
      "requested_by": "alice",
      "trace": {"trace_id": "<32 hex>", "correlation_id": "<caller's request id>"}  # optional
    }

with an ``Idempotency-Key`` header (required). Unknown fields are refused, not
ignored, so a caller's typo never silently drops data. ``trace`` is metadata of
one attempt and not part of what the key stands for: a retry in a new trace is
still a replay of the same request.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from actionmesh.providers.supportdesk.store import DEFAULT_QUEUE, SEVERITIES, NewEscalation
from actionmesh.rpc.identifiers import RECORD_TYPE, TENANT, IdentifierRule

MAX_BODY_BYTES = 64 * 1024
MAX_KEY_CHARS = 255
MAX_SUMMARY_CHARS = 2000
QUEUE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TRACE_ID_PATTERN = re.compile(r"^([0-9a-f]{32})?$")
# Visible ASCII only: keys travel in a header and are compared byte for byte.
KEY_PATTERN = re.compile(rf"^[\x21-\x7e]{{1,{MAX_KEY_CHARS}}}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

TOP_LEVEL = frozenset(
    {"tenant", "source", "summary", "severity", "target_queue", "requested_by", "trace"}
)
SOURCE_FIELDS = frozenset({"type", "id", "status"})
TRACE_FIELDS = frozenset({"trace_id", "correlation_id"})


class ApiError(Exception):
    """An HTTP error answer: status, a stable snake_case code, and field problems."""

    def __init__(
        self, status: int, code: str, message: str, fields: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = tuple(fields)

    def to_json(self) -> Mapping[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            error["fields"] = [{"field": f, "description": d} for f, d in self.fields]
        return {"error": error}


def _bad(message: str, fields: Sequence[tuple[str, str]] = ()) -> ApiError:
    return ApiError(400, "invalid_request", message, tuple(fields))


def check_idempotency_key(value: str | None) -> str:
    if value is None or value == "":
        raise _bad(
            "the Idempotency-Key header is required",
            [("Idempotency-Key", "is required")],
        )
    if not KEY_PATTERN.match(value):
        raise _bad(
            "the Idempotency-Key header is invalid",
            [("Idempotency-Key", f"must be 1-{MAX_KEY_CHARS} visible ASCII characters")],
        )
    return value


class _Fields:
    """Collects every problem of a body, so the caller fixes them in one round."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def unknown(self, path: str, value: Mapping[str, Any], allowed: frozenset[str]) -> None:
        for name in sorted(set(value) - allowed):
            self.problems.append((f"{path}{name}", "unknown field"))

    def text(
        self,
        path: str,
        value: Any,
        *,
        required: bool,
        max_len: int,
        min_len: int = 1,
        pattern: re.Pattern[str] | None = None,
        rule: IdentifierRule | None = None,
    ) -> str:
        if value is None:
            if required:
                self.problems.append((path, "is required"))
            return ""
        if not isinstance(value, str):
            self.problems.append((path, "must be a string"))
            return ""
        if not min_len <= len(value) <= max_len:
            self.problems.append((path, f"must be {min_len}-{max_len} characters"))
        elif pattern is not None and not pattern.match(value):
            self.problems.append((path, f"must match {pattern.pattern}"))
        elif rule is not None and not rule.valid(value):
            self.problems.append((path, f"must match {rule.pattern}"))
        elif _CONTROL.search(value):
            self.problems.append((path, "must not contain control characters"))
        return value

    def obj(self, path: str, value: Any, *, required: bool) -> Mapping[str, Any]:
        if value is None:
            if required:
                self.problems.append((path, "is required"))
            return {}
        if not isinstance(value, dict):
            self.problems.append((path, "must be an object"))
            return {}
        return value


def parse_json(body: bytes) -> Mapping[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _bad("the body must be a JSON object")
    return value


def parse_create(body: bytes) -> tuple[NewEscalation, str]:
    """Validate a create request; returns it and its fingerprint, or raises ApiError 400."""
    data = parse_json(body)
    fields = _Fields()
    fields.unknown("", data, TOP_LEVEL)
    tenant = fields.text("tenant", data.get("tenant"), required=True, max_len=128)
    if tenant and not TENANT.valid(tenant):
        fields.problems.append(("tenant", f"must match {TENANT.pattern}"))
    source = fields.obj("source", data.get("source"), required=True)
    fields.unknown("source.", source, SOURCE_FIELDS)
    source_type = fields.text(
        "source.type",
        source.get("type"),
        required=bool(source),
        max_len=64,
        rule=RECORD_TYPE,
    )
    source_id = fields.text("source.id", source.get("id"), required=bool(source), max_len=128)
    source_status = fields.text(
        "source.status", source.get("status"), required=False, min_len=0, max_len=64
    )
    summary = fields.text(
        "summary", data.get("summary"), required=True, min_len=3, max_len=MAX_SUMMARY_CHARS
    )
    if summary and not summary.strip():
        fields.problems.append(("summary", "must not be blank"))
    severity = data.get("severity")
    if severity is None:
        fields.problems.append(("severity", "is required"))
    elif severity not in SEVERITIES:
        fields.problems.append(("severity", "must be one of: " + ", ".join(SEVERITIES)))
    queue = (
        fields.text(
            "target_queue",
            data.get("target_queue"),
            required=False,
            max_len=64,
            pattern=QUEUE_PATTERN,
        )
        or DEFAULT_QUEUE
    )
    requested_by = fields.text("requested_by", data.get("requested_by"), required=True, max_len=256)
    trace = fields.obj("trace", data.get("trace"), required=False)
    fields.unknown("trace.", trace, TRACE_FIELDS)
    trace_id = fields.text(
        "trace.trace_id",
        trace.get("trace_id"),
        required=False,
        min_len=0,
        max_len=32,
        pattern=TRACE_ID_PATTERN,
    )
    correlation_id = fields.text(
        "trace.correlation_id",
        trace.get("correlation_id"),
        required=False,
        min_len=0,
        max_len=128,
    )
    if fields.problems:
        raise _bad("the escalation request is invalid", fields.problems)
    new = NewEscalation(
        tenant=tenant,
        source_type=source_type,
        source_id=source_id,
        source_status=source_status,
        summary=summary,
        severity=str(severity),
        queue=queue,
        requested_by=requested_by,
        trace_id=trace_id,
        correlation_id=correlation_id,
    )
    return new, fingerprint(new)


def fingerprint(new: NewEscalation) -> str:
    """What a repeated Idempotency-Key must match to be a replay.

    Trace ids and the record's status at hand-off describe one attempt, not the
    request: a retry in a new trace, after the record moved on, is still a replay.
    """
    canonical = json.dumps(
        {
            "tenant": new.tenant,
            "source": [new.source_type, new.source_id],
            "summary": new.summary,
            "severity": new.severity,
            "queue": new.queue,
            "requested_by": new.requested_by,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
