"""Small proto <-> Python conversions used by several services."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from google.protobuf import timestamp_pb2

from actionmesh.v1 import common_pb2


@overload
def to_timestamp(moment: datetime) -> timestamp_pb2.Timestamp: ...
@overload
def to_timestamp(moment: None) -> None: ...
def to_timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def input_value_to_python(value: common_pb2.InputValue) -> str | int | float | bool | None:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


def python_to_input_value(value: str | int | float | bool) -> common_pb2.InputValue:
    if isinstance(value, bool):
        return common_pb2.InputValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.InputValue(integer_value=value)
    if isinstance(value, float):
        return common_pb2.InputValue(number_value=value)
    return common_pb2.InputValue(string_value=str(value))


def display_input(value: common_pb2.InputValue) -> str:
    python = input_value_to_python(value)
    if isinstance(python, bool):
        return "true" if python else "false"
    return "" if python is None else str(python)
