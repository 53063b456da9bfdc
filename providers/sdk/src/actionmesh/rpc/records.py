"""The shape rules of a record's facts (a RecordContext), in one place.

The gateway judges every record a caller sends by :func:`record_violations`, and
every answer of a record type's system of record (ResolveRecord) by
:func:`resolved_record_violations`; the conformance kit judges a provider's
answers by the same function, so a provider that passes the kit is a source the
gateway accepts. Violations name the field and state the rule; they never echo a
value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from actionmesh.rpc.errors import FieldViolation
from actionmesh.rpc.identifiers import ATTRIBUTE_KEY, RECORD_ID, RECORD_TYPE
from actionmesh.v1 import common_pb2, provider_pb2

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY",
    "MAX_ATTRIBUTE_VALUE",
    "MAX_STATUS",
    "MAX_TENANT",
    "MAX_VERSION",
    "free_text",
    "plain_text",
    "record_violations",
    "resolved_record_violations",
]

MAX_TENANT = 128
MAX_STATUS = 64
# Etags and revisions are short; this only keeps the discovery cache key bounded.
MAX_VERSION = 128
MAX_ATTRIBUTES = 16
# Keys appear in policy (context.record.attributes.KEY) and in evidence paths.
MAX_ATTRIBUTE_KEY = ATTRIBUTE_KEY.max_length
MAX_ATTRIBUTE_VALUE = 256
_SENSITIVITIES = frozenset(common_pb2.Sensitivity.values())
# No control characters in identifiers and labels; free text (input strings,
# attribute values) may hold tabs and line breaks, nothing else below 0x20. NUL in
# particular cannot be stored in PostgreSQL text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def plain_text(text: str) -> bool:
    """No control characters at all (identifiers, labels, statuses, versions)."""
    return _CONTROL.search(text) is None


def free_text(text: str) -> bool:
    """No control characters but tab and line breaks (input strings, attribute values)."""
    return _TEXT_CONTROL.search(text) is None


def record_violations(
    record: common_pb2.RecordContext, present: bool, path: str = "record"
) -> list[FieldViolation]:
    """What is wrong with a record's tenant, type, id, status, sensitivity, version, attributes."""
    if not present:
        return [FieldViolation(path, "is required")]
    problems = []
    if not record.tenant or len(record.tenant) > MAX_TENANT or not plain_text(record.tenant):
        problems.append(
            FieldViolation(
                f"{path}.tenant", f"must be 1..{MAX_TENANT} characters, no control characters"
            )
        )
    if not RECORD_TYPE.valid(record.type):
        problems.append(FieldViolation(f"{path}.type", "must match ^[a-z][a-z0-9_.-]{0,63}$"))
    if not RECORD_ID.valid(record.id):
        problems.append(
            FieldViolation(f"{path}.id", "must be 1..256 of letters, digits and _ . : / -")
        )
    if len(record.status) > MAX_STATUS or not plain_text(record.status):
        problems.append(
            FieldViolation(
                f"{path}.status",
                f"must be at most {MAX_STATUS} characters, no control characters",
            )
        )
    if record.sensitivity not in _SENSITIVITIES:
        problems.append(
            FieldViolation(
                f"{path}.sensitivity", "must be NORMAL, SENSITIVE, RESTRICTED or unspecified"
            )
        )
    if len(record.version) > MAX_VERSION or not plain_text(record.version):
        problems.append(
            FieldViolation(
                f"{path}.version",
                f"must be at most {MAX_VERSION} characters, no control characters",
            )
        )
    problems.extend(_attribute_violations(record.attributes, f"{path}.attributes"))
    return problems


def _attribute_violations(attributes: Mapping[str, str], path: str) -> list[FieldViolation]:
    if len(attributes) > MAX_ATTRIBUTES:
        # Past the count there is no point judging each one (and the list stays short).
        return [FieldViolation(path, f"at most {MAX_ATTRIBUTES} attributes")]
    problems = []
    bad_keys = False
    for key, value in sorted(attributes.items()):
        if not ATTRIBUTE_KEY.valid(key):
            bad_keys = True
            continue
        if len(value) > MAX_ATTRIBUTE_VALUE or not free_text(value):
            problems.append(
                FieldViolation(
                    f"{path}[{key}]",
                    f"must be at most {MAX_ATTRIBUTE_VALUE} characters, "
                    "no control characters but tab and line breaks",
                )
            )
    if bad_keys:
        problems.append(
            FieldViolation(
                path,
                f"keys must be 1..{MAX_ATTRIBUTE_KEY} of letters, digits and _ . - "
                "starting with a letter",
            )
        )
    return problems


def resolved_record_violations(
    reply: provider_pb2.ResolveRecordResponse, tenant: str, record_type: str, record_id: str
) -> list[FieldViolation]:
    """What is wrong with a record source's ResolveRecord answer to (tenant, type, id).

    The answer must carry a record that echoes the tenant, type and id asked, has a
    version (it changes whenever the facts do) and obeys :func:`record_violations`.
    An empty list: the gateway governs on the answer.
    """
    if not reply.HasField("record"):
        return [FieldViolation("record", "is required")]
    record = reply.record
    problems = [
        FieldViolation(f"record.{name}", f"must be the {name} asked for")
        for name, answered, asked in (
            ("tenant", record.tenant, tenant),
            ("type", record.type, record_type),
            ("id", record.id, record_id),
        )
        if answered != asked
    ]
    if not record.version:
        problems.append(
            FieldViolation("record.version", "is required: it changes whenever the facts do")
        )
    problems.extend(record_violations(record, True))
    return problems
