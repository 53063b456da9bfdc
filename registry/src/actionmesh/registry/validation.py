"""Checks a registration before anything is stored.

A bad registration is reported with every problem at once, each as a field
violation whose path (``actions[1].inputs[0].name``) points into the request, so
a provider team fixes its descriptors in one round trip.
"""

from __future__ import annotations

import re

from actionmesh.registry.model import Registration
from actionmesh.rpc.errors import FieldViolation, InvalidArgument
from actionmesh.rpc.identifiers import ACTION_ID, PROVIDER_ID, RECORD_TYPE
from actionmesh.rpc.schema import schema_violations

# Same alphabet as RecordRef.type in common.proto, so a declared type can match a record.
_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]"  # bracketed IPv6, as gRPC targets spell it
    r"|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$"  # hostname or IPv4
)
_PORT = re.compile(r"^[0-9]{1,5}$")

# Bounds that keep one registration from bloating every watcher's snapshot.
MAX_ENDPOINT_LENGTH = 255
MAX_VERSION_LENGTH = 128

REASON = "INVALID_REGISTRATION"


MAX_RECORD_SOURCES = 64


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not a dialable host:port, or None when it is."""
    if len(endpoint) > MAX_ENDPOINT_LENGTH:
        return f"must be at most {MAX_ENDPOINT_LENGTH} characters"
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        return "must be host:port, e.g. 127.0.0.1:50061"
    if not _HOST.match(host):
        return "host must be a hostname, an IPv4 address or a bracketed IPv6 address"
    if not _PORT.match(port) or not 1 <= int(port) <= 65535:
        return "port must be a number from 1 to 65535"
    return None


def validate_registration(registration: Registration) -> None:
    """Raise InvalidArgument listing every problem of ``registration``."""
    violations: list[FieldViolation] = []
    if not PROVIDER_ID.valid(registration.provider_id):
        violations.append(
            FieldViolation(
                "provider_id",
                "must be 2-63 characters: a lower case letter, then lower case letters, "
                "digits, '_', '.' or '-'",
            )
        )
    problem = endpoint_problem(registration.endpoint)
    if problem:
        violations.append(FieldViolation("endpoint", problem))
    if len(registration.version) > MAX_VERSION_LENGTH:
        violations.append(
            FieldViolation("version", f"must be at most {MAX_VERSION_LENGTH} characters")
        )
    if not registration.actions and not registration.record_sources:
        violations.append(
            FieldViolation("actions", "declare at least one action or one record source")
        )
    first_index: dict[str, int] = {}
    for index, action in enumerate(registration.actions):
        path = f"actions[{index}]"
        if not ACTION_ID.valid(action.action_id):
            violations.append(
                FieldViolation(
                    f"{path}.action_id",
                    "must be dotted lower case segments, e.g. workitem.retry",
                )
            )
        elif action.action_id in first_index:
            violations.append(
                FieldViolation(
                    f"{path}.action_id",
                    f"duplicates actions[{first_index[action.action_id]}].action_id",
                )
            )
        else:
            first_index[action.action_id] = index
        if not action.label.strip():
            violations.append(FieldViolation(f"{path}.label", "must not be empty"))
        if not action.record_types:
            violations.append(
                FieldViolation(f"{path}.record_types", "declare at least one record type")
            )
        for type_index, record_type in enumerate(action.record_types):
            if not RECORD_TYPE.valid(record_type):
                violations.append(
                    FieldViolation(
                        f"{path}.record_types[{type_index}]",
                        "must be lower case letters, digits, '_', '.' or '-'",
                    )
                )
        # One schema checker for registry, SDK and gateway, so they can never disagree.
        violations.extend(schema_violations(action.inputs, f"{path}.inputs"))
    for index, record_type in enumerate(registration.record_sources):
        if not RECORD_TYPE.valid(record_type):
            violations.append(
                FieldViolation(
                    f"record_sources[{index}]",
                    "must be lower case letters, digits, '_', '.' or '-'",
                )
            )
        elif registration.record_sources.index(record_type) != index:
            violations.append(FieldViolation(f"record_sources[{index}]", "is listed twice"))
    if len(registration.record_sources) > MAX_RECORD_SOURCES:
        violations.append(
            FieldViolation("record_sources", f"at most {MAX_RECORD_SOURCES} record types")
        )
    if violations:
        raise InvalidArgument(
            f"invalid registration: {len(violations)} problem(s)",
            reason=REASON,
            violations=violations,
        )
