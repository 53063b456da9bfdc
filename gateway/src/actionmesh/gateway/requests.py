"""Shape checks of caller requests, before anything else looks at them.

Every size and shape limit of what a caller may send the gateway is checked here (the
input limits an action's schema also enforces come from :mod:`actionmesh.rpc.schema`,
and a record's from :mod:`actionmesh.rpc.records`, which also judges the answers of
record sources, for the gateway and the conformance kit alike: none can disagree).
The checks run before the tenant, the directory or policy see a request, so nothing
downstream (Cedar, the stores, audit evidence) ever holds an unbounded or malformed
value. The whole request is bounded as well: the gateway's gRPC server refuses messages over
``GatewayConfig.max_request_bytes`` with RESOURCE_EXHAUSTED before decoding them.

Violations name the field (``record.attributes``, ``inputs.reason``) and state the
rule; they never echo a submitted value, and echo a caller-chosen name (an input
name, an attribute key) only when it matches the name pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from actionmesh.rpc.errors import FieldViolation, InvalidArgument
from actionmesh.rpc.identifiers import (
    ACTION_ID,
    ATTRIBUTE_KEY,
    IDEMPOTENCY_KEY,
    INPUT_NAME,
    RECORD_ID,
    RECORD_TYPE,
)
from actionmesh.rpc.records import (
    MAX_ATTRIBUTE_KEY,
    MAX_ATTRIBUTE_VALUE,
    MAX_ATTRIBUTES,
    MAX_STATUS,
    MAX_TENANT,
    MAX_VERSION,
    free_text,
    record_violations,
)
from actionmesh.rpc.schema import MAX_INPUTS, MAX_STRING_CHARS
from actionmesh.v1 import common_pb2

__all__ = [
    "ACTION_ID",
    "ATTRIBUTE_KEY",
    "IDEMPOTENCY_KEY",
    "MAX_ACTION_ID",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY",
    "MAX_ATTRIBUTE_VALUE",
    "MAX_INPUTS",
    "MAX_INPUT_NAME",
    "MAX_LISTED_VIOLATIONS",
    "MAX_STATUS",
    "MAX_STRING_CHARS",
    "MAX_TENANT",
    "MAX_VERSION",
    "RECORD_ID",
    "RECORD_TYPE",
    "check_record",
    "execute_violations",
    "input_violations",
    "listed",
    "record_violations",
]

# The identifier rules are the contract's (actionmesh.rpc.identifiers), shared with
# the registry, the SDK and the support platform; the shape rules of a record are
# actionmesh.rpc.records, shared with the record sources' answers and the conformance kit.
MAX_ACTION_ID = ACTION_ID.max_length
# Same pattern as a declared input name (^[a-z][a-z0-9_]{0,63}$).
MAX_INPUT_NAME = 64
# Error details travel in a trailer that gRPC refuses past 8 KiB (after base64): past
# this many violations the rest are summarised in one, so the refusal stays readable.
MAX_LISTED_VIOLATIONS = 20


def listed(problems: list[FieldViolation]) -> list[FieldViolation]:
    """At most MAX_LISTED_VIOLATIONS, the last one counting those left out."""
    if len(problems) <= MAX_LISTED_VIOLATIONS:
        return problems
    kept, hidden = problems[: MAX_LISTED_VIOLATIONS - 1], problems[MAX_LISTED_VIOLATIONS - 1 :]
    where = re.split(r"[.\[]", hidden[0].field, maxsplit=1)[0]
    return [*kept, FieldViolation(where, f"has {len(hidden)} more problems not listed")]


def check_record(record: common_pb2.RecordContext, present: bool) -> None:
    problems = listed(record_violations(record, present))
    if problems:
        raise InvalidArgument("invalid record", reason="INVALID_RECORD", violations=problems)


def input_violations(
    inputs: Mapping[str, common_pb2.InputValue], path: str = "inputs"
) -> list[FieldViolation]:
    """The limits every input obeys whatever the action declares.

    The action's own schema (types, required, bounds, allowed values) is checked
    later, against the descriptor, by :func:`actionmesh.rpc.schema.validate_inputs`.
    """
    if len(inputs) > MAX_INPUTS:
        return [FieldViolation(path, f"must have at most {MAX_INPUTS} inputs")]
    problems = []
    bad_names = False
    for name, value in sorted(inputs.items()):
        if not INPUT_NAME.valid(name):
            bad_names = True
            continue
        if value.WhichOneof("kind") != "string_value":
            continue
        text = value.string_value
        if len(text) > MAX_STRING_CHARS:
            problems.append(
                FieldViolation(f"{path}.{name}", f"must be at most {MAX_STRING_CHARS} characters")
            )
        elif not free_text(text):
            problems.append(
                FieldViolation(
                    f"{path}.{name}", "must not hold control characters but tab and line breaks"
                )
            )
    if bad_names:
        problems.append(
            FieldViolation(
                path,
                f"input names must be 1..{MAX_INPUT_NAME} of lower case letters, digits and _ "
                "starting with a letter",
            )
        )
    return problems


def execute_violations(
    action_id: str,
    record: common_pb2.RecordContext,
    has_record: bool,
    idempotency_key: str | None,
    inputs: Mapping[str, common_pb2.InputValue] | None = None,
) -> list[FieldViolation]:
    """What is wrong with an ExecuteAction request (a PreviewAction's: key None)."""
    problems = []
    if not ACTION_ID.valid(action_id):
        problems.append(
            FieldViolation(
                "action_id",
                f"must be a dotted id like 'workitem.retry', at most {MAX_ACTION_ID} characters",
            )
        )
    problems.extend(record_violations(record, has_record))
    if idempotency_key is not None and not IDEMPOTENCY_KEY.valid(idempotency_key):
        problems.append(
            FieldViolation("idempotency_key", "is required: 1..128 of letters, digits and _ . : -")
        )
    if inputs is not None:
        problems.extend(input_violations(inputs))
    return listed(problems)
