"""The input schema of an action: checking a schema, and checking inputs against it.

Shared by the gateway (which validates every Execute before dispatch) and the
provider SDK (which validates again, as defence in depth, and checks a
provider's declared schema when it is defined).

Violation descriptions state the rule that was broken ("must be at most 200
characters") and never the submitted value: inputs may carry sensitive record
data, and error details end up in logs and audit records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from actionmesh.rpc.errors import FieldViolation, InvalidArgument
from actionmesh.rpc.identifiers import INPUT_NAME
from actionmesh.v1 import common_pb2

InputPython = str | int | float | bool

MAX_INPUTS = 32
MAX_STRING_CHARS = 4096
# Error details travel in trailing metadata (8 KiB by default); past this many
# violations the rest are summarised so the status itself stays deliverable.
MAX_VIOLATIONS = 40

_TYPE_NAMES: dict[int, str] = {
    common_pb2.INPUT_TYPE_STRING: "a string",
    common_pb2.INPUT_TYPE_INTEGER: "an integer",
    common_pb2.INPUT_TYPE_NUMBER: "a number",
    common_pb2.INPUT_TYPE_BOOLEAN: "a boolean",
    common_pb2.INPUT_TYPE_ENUM: "a string",
}


def _fmt(bound: float) -> str:
    """A bound as people write it: 10 rather than 10.0."""
    if math.isfinite(bound) and bound.is_integer() and abs(bound) < 1e15:
        return str(int(bound))
    return repr(bound)


@dataclass(frozen=True)
class _Problem:
    """The rule an input broke (kept apart from values so a string is never mistaken)."""

    rule: str


def _check_value(
    field: common_pb2.InputField, value: common_pb2.InputValue
) -> InputPython | _Problem:
    """The python value, or the rule it broke."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return _Problem("must have a value")
    expected = _TYPE_NAMES.get(field.type)
    if expected is None:
        # The schema itself is broken; schema_problems() reports why.
        return _Problem("is declared with an unsupported type")

    if field.type in (common_pb2.INPUT_TYPE_STRING, common_pb2.INPUT_TYPE_ENUM):
        if kind != "string_value":
            return _Problem(f"must be {expected}")
        text = value.string_value
        if field.type == common_pb2.INPUT_TYPE_ENUM:
            if text not in field.allowed_values:
                return _Problem("must be one of: " + ", ".join(field.allowed_values))
            return text
        if len(text) > MAX_STRING_CHARS:
            return _Problem(f"must be at most {MAX_STRING_CHARS} characters")
        if field.HasField("min_length") and len(text) < field.min_length:
            return _Problem(f"must be at least {field.min_length} characters")
        if field.HasField("max_length") and len(text) > field.max_length:
            return _Problem(f"must be at most {field.max_length} characters")
        return text

    if field.type == common_pb2.INPUT_TYPE_BOOLEAN:
        if kind != "bool_value":
            return _Problem(f"must be {expected}")
        return value.bool_value

    number: int | float
    if field.type == common_pb2.INPUT_TYPE_INTEGER:
        if kind != "integer_value":
            return _Problem(f"must be {expected}")
        number = value.integer_value
    else:
        if kind == "integer_value":
            number = float(value.integer_value)
        elif kind == "number_value":
            number = value.number_value
            if not math.isfinite(number):
                return _Problem("must be a finite number")
        else:
            return _Problem(f"must be {expected}")
    if field.HasField("minimum") and number < field.minimum:
        return _Problem(f"must be at least {_fmt(field.minimum)}")
    if field.HasField("maximum") and number > field.maximum:
        return _Problem(f"must be at most {_fmt(field.maximum)}")
    return number


def validate_inputs(
    fields: Sequence[common_pb2.InputField],
    values: Mapping[str, common_pb2.InputValue],
    *,
    path: str = "inputs",
) -> dict[str, str | int | float | bool]:
    """Check ``values`` against the declared ``fields``; return the python values sent.

    Defaults are not filled in: the result holds exactly the inputs that were
    sent. Every problem is collected and raised together as
    ``InvalidArgument(reason="INVALID_INPUT")`` with one field violation per
    input (``inputs.reason``), describing the rule, never the value.
    """
    declared: dict[str, common_pb2.InputField] = {}
    for field in fields:
        declared.setdefault(field.name, field)

    violations: list[FieldViolation] = []
    if len(values) > MAX_INPUTS:
        violations.append(FieldViolation(path, f"must have at most {MAX_INPUTS} inputs"))

    result: dict[str, InputPython] = {}
    for name, field in declared.items():
        where = f"{path}.{name}"
        if name not in values:
            if field.required:
                violations.append(FieldViolation(where, "is required"))
            continue
        checked = _check_value(field, values[name])
        if isinstance(checked, _Problem):
            violations.append(FieldViolation(where, checked.rule))
        else:
            result[name] = checked

    unknown = sorted(name for name in values if name not in declared)
    # An undeclared name is caller-controlled text: only echo it in the field path
    # when it looks like a name, otherwise report it once without repeating it.
    garbled = False
    for name in unknown:
        if INPUT_NAME.valid(name):
            violations.append(FieldViolation(f"{path}.{name}", "is not an input of this action"))
        else:
            garbled = True
    if garbled:
        violations.append(
            FieldViolation(path, "has input names that are not inputs of this action")
        )

    if violations:
        if len(violations) > MAX_VIOLATIONS:
            hidden = len(violations) - (MAX_VIOLATIONS - 1)
            violations = [
                *violations[: MAX_VIOLATIONS - 1],
                FieldViolation(path, f"has {hidden} more problems not listed"),
            ]
        count = len(violations)
        raise InvalidArgument(
            f"{count} invalid input{'s' if count != 1 else ''}; see the field violations",
            reason="INVALID_INPUT",
            violations=violations,
        )
    return result


def _label(name: str) -> str:
    shown = name if len(name) <= 40 else name[:40] + "..."
    return f"input {shown!r}"


def _schema_findings(fields: Sequence[common_pb2.InputField]) -> list[tuple[str, str, str]]:
    """(input label, path suffix, description) of every problem of a declared schema."""
    problems: list[tuple[str, str, str]] = []
    if len(fields) > MAX_INPUTS:
        problems.append(
            ("", "", f"an action may declare at most {MAX_INPUTS} inputs, not {len(fields)}")
        )
    seen: set[str] = set()
    for index, field in enumerate(fields):
        label = _label(field.name)

        def add(attr: str, description: str, label: str = label, index: int = index) -> None:
            problems.append((label, f"[{index}].{attr}", description))

        if not INPUT_NAME.valid(field.name):
            add("name", f"name must match {INPUT_NAME.pattern}")
        if field.name in seen:
            add("name", "declared more than once")
        seen.add(field.name)

        if field.type not in _TYPE_NAMES:
            add("type", "type must be set (STRING, INTEGER, NUMBER, BOOLEAN or ENUM)")
            continue
        is_text = field.type == common_pb2.INPUT_TYPE_STRING
        is_number = field.type in (common_pb2.INPUT_TYPE_INTEGER, common_pb2.INPUT_TYPE_NUMBER)
        is_enum = field.type == common_pb2.INPUT_TYPE_ENUM

        has_length = field.HasField("min_length") or field.HasField("max_length")
        if has_length and not is_text:
            add("min_length", "min_length/max_length apply to STRING inputs only")
        if (
            field.HasField("min_length")
            and field.HasField("max_length")
            and field.min_length > field.max_length
        ):
            add("max_length", f"min_length {field.min_length} > max_length {field.max_length}")
        if field.HasField("min_length") and field.min_length > MAX_STRING_CHARS:
            add("min_length", f"min_length exceeds the {MAX_STRING_CHARS} character cap")

        has_bounds = field.HasField("minimum") or field.HasField("maximum")
        if has_bounds and not is_number:
            add("minimum", "minimum/maximum apply to INTEGER and NUMBER inputs only")
        for bound_name in ("minimum", "maximum"):
            if field.HasField(bound_name) and math.isnan(getattr(field, bound_name)):
                add(bound_name, f"{bound_name} must be a number, not NaN")
        if (
            field.HasField("minimum")
            and field.HasField("maximum")
            and field.minimum > field.maximum
        ):
            add("maximum", f"minimum {_fmt(field.minimum)} > maximum {_fmt(field.maximum)}")

        if is_enum:
            if not field.allowed_values:
                add("allowed_values", "ENUM inputs need allowed_values")
            if len(set(field.allowed_values)) != len(field.allowed_values):
                add("allowed_values", "allowed_values has duplicates")
            if any(not v or len(v) > MAX_STRING_CHARS for v in field.allowed_values):
                add(
                    "allowed_values",
                    f"allowed_values must be non-empty strings of at most "
                    f"{MAX_STRING_CHARS} characters",
                )
        elif field.allowed_values:
            add("allowed_values", "allowed_values apply to ENUM inputs only")
    return problems


def schema_problems(fields: Sequence[common_pb2.InputField]) -> list[str]:
    """Why a declared input schema is ill-formed; empty when it is fine."""
    return [
        f"{label}: {description}" if label else description
        for label, _, description in _schema_findings(fields)
    ]


def schema_violations(
    fields: Sequence[common_pb2.InputField], path: str = "inputs"
) -> list[FieldViolation]:
    """The same problems as field violations pointing into a request (``inputs[2].type``)."""
    return [
        FieldViolation(f"{path}{suffix}", description)
        for _, suffix, description in _schema_findings(fields)
    ]
