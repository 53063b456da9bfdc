"""What the conformance kit sends: sample records, and inputs derived from a declared schema.

Valid inputs are the smallest plausible values the schema allows (the first
allowed enum value, a short string padded or cut to the length bounds, a number
clamped into its bounds). Invalid inputs break exactly one rule of one input
while every other input stays valid, so the violation the provider reports can
be matched to the input that was broken.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from actionmesh.rpc.schema import MAX_STRING_CHARS
from actionmesh.v1 import common_pb2

_RECORD_PATTERN = re.compile(
    r"^(?P<tenant>[^/\s]+)/(?P<type>[^/\s]+)/(?P<id>[^/:\s]+)(:(?P<status>\S*))?$"
)
SAMPLE_TEXT = "conformance check"
NOT_AN_INPUT = "conformance_unknown_input"


@dataclass(frozen=True)
class SampleRecord:
    """A record the provider may act on, as ``TENANT/TYPE/ID[:STATUS]``."""

    tenant: str
    type: str
    id: str
    status: str = ""

    @classmethod
    def parse(cls, text: str) -> SampleRecord:
        """Parse ``acme/workitem/wi-1001:failed``; raise ValueError when malformed."""
        match = _RECORD_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(
                f"a sample record is TENANT/TYPE/ID[:STATUS], e.g. acme/workitem/wi-1001:failed "
                f"(got {text!r})"
            )
        return cls(
            tenant=match["tenant"], type=match["type"], id=match["id"], status=match["status"] or ""
        )

    def to_proto(self) -> common_pb2.RecordContext:
        return common_pb2.RecordContext(
            tenant=self.tenant,
            type=self.type,
            id=self.id,
            status=self.status,
            sensitivity=common_pb2.SENSITIVITY_NORMAL,
        )

    def __str__(self) -> str:
        text = f"{self.tenant}/{self.type}/{self.id}"
        return f"{text}:{self.status}" if self.status else text


def _text(field: common_pb2.InputField) -> str:
    low = field.min_length if field.HasField("min_length") else 0
    high = field.max_length if field.HasField("max_length") else MAX_STRING_CHARS
    text = SAMPLE_TEXT[:high]
    return text + "x" * max(0, low - len(text))


def _number(field: common_pb2.InputField, integer: bool) -> float:
    low = field.minimum if field.HasField("minimum") else -math.inf
    high = field.maximum if field.HasField("maximum") else math.inf
    if integer and math.isfinite(low):
        low = math.ceil(low)
    if integer and math.isfinite(high):
        high = math.floor(high)
    return min(max(1.0, low), high)


def valid_value(field: common_pb2.InputField) -> common_pb2.InputValue:
    """A value that satisfies the field's declared type and bounds."""
    if field.type == common_pb2.INPUT_TYPE_ENUM:
        return common_pb2.InputValue(string_value=field.allowed_values[0])
    if field.type == common_pb2.INPUT_TYPE_BOOLEAN:
        return common_pb2.InputValue(bool_value=False)
    if field.type == common_pb2.INPUT_TYPE_INTEGER:
        return common_pb2.InputValue(integer_value=int(_number(field, integer=True)))
    if field.type == common_pb2.INPUT_TYPE_NUMBER:
        return common_pb2.InputValue(number_value=_number(field, integer=False))
    return common_pb2.InputValue(string_value=_text(field))


def valid_inputs(fields: Sequence[common_pb2.InputField]) -> dict[str, common_pb2.InputValue]:
    """Values for the required inputs; optional ones are left to the provider's defaults."""
    return {f.name: valid_value(f) for f in fields if f.required}


def parse_input(raw: str, field: common_pb2.InputField | None) -> common_pb2.InputValue:
    """Convert a ``--input name=value`` with the declared type of the input.

    Raises ValueError when the text cannot be read as that type.
    """
    kind = field.type if field is not None else common_pb2.INPUT_TYPE_STRING
    if kind == common_pb2.INPUT_TYPE_BOOLEAN:
        lowered = raw.strip().lower()
        if lowered not in ("true", "false"):
            raise ValueError("must be true or false")
        return common_pb2.InputValue(bool_value=lowered == "true")
    if kind == common_pb2.INPUT_TYPE_INTEGER:
        return common_pb2.InputValue(integer_value=int(raw))
    if kind == common_pb2.INPUT_TYPE_NUMBER:
        return common_pb2.InputValue(number_value=float(raw))
    return common_pb2.InputValue(string_value=raw)


@dataclass(frozen=True)
class InvalidCase:
    """One request whose inputs break one rule; ``field`` is the input to blame."""

    label: str
    field: str
    inputs: Mapping[str, common_pb2.InputValue]


def _wrong_type(field: common_pb2.InputField) -> common_pb2.InputValue:
    if field.type in (common_pb2.INPUT_TYPE_STRING, common_pb2.INPUT_TYPE_ENUM):
        return common_pb2.InputValue(integer_value=1)
    if field.type == common_pb2.INPUT_TYPE_BOOLEAN:
        return common_pb2.InputValue(string_value="true")
    # A string is wrong for INTEGER and NUMBER alike (an integer is a valid NUMBER).
    return common_pb2.InputValue(string_value="1")


def _usable(bound: float) -> bool:
    # Past 2**52 a float cannot step outside the bound by one.
    return math.isfinite(bound) and abs(bound) < 2**52


def _out_of_bounds(field: common_pb2.InputField) -> list[tuple[str, common_pb2.InputValue]]:
    cases: list[tuple[str, common_pb2.InputValue]] = []
    if field.type == common_pb2.INPUT_TYPE_ENUM:
        cases.append(("not an allowed value", common_pb2.InputValue(string_value="not-allowed")))
    elif field.type == common_pb2.INPUT_TYPE_STRING:
        if field.HasField("min_length") and field.min_length > 0:
            short = "x" * (field.min_length - 1)
            cases.append(("shorter than min_length", common_pb2.InputValue(string_value=short)))
        if field.HasField("max_length") and field.max_length < MAX_STRING_CHARS:
            long = "x" * (field.max_length + 1)
            cases.append(("longer than max_length", common_pb2.InputValue(string_value=long)))
    elif field.type in (common_pb2.INPUT_TYPE_INTEGER, common_pb2.INPUT_TYPE_NUMBER):
        integer = field.type == common_pb2.INPUT_TYPE_INTEGER
        outside: list[tuple[str, float]] = []
        if field.HasField("minimum") and _usable(field.minimum):
            outside.append(("below minimum", math.floor(field.minimum) - 1))
        if field.HasField("maximum") and _usable(field.maximum):
            outside.append(("above maximum", math.ceil(field.maximum) + 1))
        for label, number in outside:
            value = (
                common_pb2.InputValue(integer_value=int(number))
                if integer
                else common_pb2.InputValue(number_value=float(number))
            )
            cases.append((label, value))
    return cases


def invalid_cases(fields: Sequence[common_pb2.InputField]) -> list[InvalidCase]:
    """Requests that a provider validating against ``fields`` must refuse.

    Per input: missing (when required), of the wrong type, and outside each
    declared bound; plus one undeclared input name, so actions without inputs
    are probed too.
    """
    base = valid_inputs(fields)
    cases: list[InvalidCase] = []
    for field in fields:
        if field.required:
            rest = {name: value for name, value in base.items() if name != field.name}
            cases.append(InvalidCase(f"{field.name} missing", field.name, rest))
        cases.append(
            InvalidCase(
                f"{field.name} of the wrong type",
                field.name,
                {**base, field.name: _wrong_type(field)},
            )
        )
        for label, value in _out_of_bounds(field):
            cases.append(
                InvalidCase(f"{field.name} {label}", field.name, {**base, field.name: value})
            )
    cases.append(
        InvalidCase(
            "an undeclared input",
            NOT_AN_INPUT,
            {**base, NOT_AN_INPUT: common_pb2.InputValue(string_value=SAMPLE_TEXT)},
        )
    )
    return cases
