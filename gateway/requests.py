"""Shape checks of caller requests, before anything else looks at them."""

from __future__ import annotations

import re

from actionmesh.rpc.errors import FieldViolation, InvalidArgument
from actionmesh.v1 import common_pb2

ACTION_ID = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$")
RECORD_TYPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
RECORD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,255}$")
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_ATTRIBUTES = 16
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_VALUE = 256
MAX_STATUS = 64
MAX_TENANT = 128


def record_violations(
    record: common_pb2.RecordContext, present: bool, path: str = "record"
) -> list[FieldViolation]:
    if not present:
        return [FieldViolation(path, "is required")]
    problems = []
    if not record.tenant or len(record.tenant) > MAX_TENANT:
        problems.append(FieldViolation(f"{path}.tenant", f"must be 1..{MAX_TENANT} characters"))
    if not RECORD_TYPE.match(record.type):
        problems.append(FieldViolation(f"{path}.type", "must match ^[a-z][a-z0-9_.-]{0,63}$"))
    if not RECORD_ID.match(record.id):
        problems.append(
            FieldViolation(f"{path}.id", "must be 1..256 of letters, digits and _ . : / -")
        )
    if len(record.status) > MAX_STATUS:
        problems.append(
            FieldViolation(f"{path}.status", f"must be at most {MAX_STATUS} characters")
        )
    if len(record.attributes) > MAX_ATTRIBUTES:
        problems.append(
            FieldViolation(f"{path}.attributes", f"at most {MAX_ATTRIBUTES} attributes")
        )
    for key, value in record.attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_KEY:
            problems.append(
                FieldViolation(
                    f"{path}.attributes", f"keys must be 1..{MAX_ATTRIBUTE_KEY} characters"
                )
            )
        if len(value) > MAX_ATTRIBUTE_VALUE:
            problems.append(
                FieldViolation(
                    f"{path}.attributes[{key[:MAX_ATTRIBUTE_KEY]}]",
                    f"must be at most {MAX_ATTRIBUTE_VALUE} characters",
                )
            )
    return problems


def check_record(record: common_pb2.RecordContext, present: bool) -> None:
    problems = record_violations(record, present)
    if problems:
        raise InvalidArgument("invalid record", reason="INVALID_RECORD", violations=problems)


def execute_violations(
    action_id: str, record: common_pb2.RecordContext, has_record: bool, idempotency_key: str
) -> list[FieldViolation]:
    problems = []
    if not ACTION_ID.match(action_id) or len(action_id) > 128:
        problems.append(FieldViolation("action_id", "must be a dotted id like 'workitem.retry'"))
    problems.extend(record_violations(record, has_record))
    if not IDEMPOTENCY_KEY.match(idempotency_key):
        problems.append(
            FieldViolation("idempotency_key", "is required: 1..128 of letters, digits and _ . : -")
        )
    return problems
