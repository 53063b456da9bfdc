"""The input schema validator shared by the gateway and the provider SDK."""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
import pytest

from actionmesh.rpc.errors import InvalidArgument
from actionmesh.rpc.schema import MAX_INPUTS, MAX_VIOLATIONS, schema_problems, validate_inputs
from actionmesh.v1 import common_pb2

STRING = common_pb2.INPUT_TYPE_STRING
INTEGER = common_pb2.INPUT_TYPE_INTEGER
NUMBER = common_pb2.INPUT_TYPE_NUMBER
BOOLEAN = common_pb2.INPUT_TYPE_BOOLEAN
ENUM = common_pb2.INPUT_TYPE_ENUM

FIELDS = [
    common_pb2.InputField(name="reason", type=STRING, required=True, min_length=3, max_length=200),
    common_pb2.InputField(name="priority", type=ENUM, allowed_values=["low", "normal", "high"]),
    common_pb2.InputField(name="count", type=INTEGER, minimum=1, maximum=10),
    common_pb2.InputField(name="ratio", type=NUMBER, minimum=0, maximum=1),
    common_pb2.InputField(name="notify", type=BOOLEAN),
]


def s(text: str) -> common_pb2.InputValue:
    return common_pb2.InputValue(string_value=text)


def i(number: int) -> common_pb2.InputValue:
    return common_pb2.InputValue(integer_value=number)


def n(number: float) -> common_pb2.InputValue:
    return common_pb2.InputValue(number_value=number)


def b(flag: bool) -> common_pb2.InputValue:
    return common_pb2.InputValue(bool_value=flag)


def problems(
    values: dict[str, common_pb2.InputValue],
    fields: Sequence[common_pb2.InputField] = FIELDS,
) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_inputs(fields, values)
    assert caught.value.reason == "INVALID_INPUT"
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return {v.field: v.description for v in caught.value.violations}


def test_valid_inputs_return_python_values_without_defaults() -> None:
    values = {"reason": s("parser fixed"), "count": i(3), "ratio": n(0.5), "notify": b(True)}
    assert validate_inputs(FIELDS, values) == {
        "reason": "parser fixed",
        "count": 3,
        "ratio": 0.5,
        "notify": True,
    }


def test_number_accepts_an_integer_and_returns_a_float() -> None:
    result = validate_inputs(FIELDS, {"reason": s("abc"), "ratio": i(1)})
    assert result["ratio"] == 1.0 and isinstance(result["ratio"], float)


def test_all_problems_are_collected_with_field_paths() -> None:
    found = problems(
        {
            "priority": s("urgent"),
            "count": s("3"),
            "ratio": n(1.5),
            "notify": i(1),
            "colour": s("red"),
        }
    )
    assert found == {
        "inputs.reason": "is required",
        "inputs.priority": "must be one of: low, normal, high",
        "inputs.count": "must be an integer",
        "inputs.ratio": "must be at most 1",
        "inputs.notify": "must be a boolean",
        "inputs.colour": "is not an input of this action",
    }


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (s("ab"), "must be at least 3 characters"),
        (s("x" * 201), "must be at most 200 characters"),
        (s("x" * 5000), "must be at most 4096 characters"),
        (i(5), "must be a string"),
        (common_pb2.InputValue(), "must have a value"),
    ],
)
def test_string_rules(value: common_pb2.InputValue, rule: str) -> None:
    assert problems({"reason": value}) == {"inputs.reason": rule}


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("count", i(0), "must be at least 1"),
        ("count", i(11), "must be at most 10"),
        ("count", n(2.0), "must be an integer"),
        ("ratio", n(-0.1), "must be at least 0"),
        ("ratio", n(math.nan), "must be a finite number"),
        ("ratio", n(math.inf), "must be a finite number"),
        ("ratio", s("0.5"), "must be a number"),
        ("priority", i(1), "must be a string"),
    ],
)
def test_number_and_enum_rules(field: str, value: common_pb2.InputValue, rule: str) -> None:
    assert problems({"reason": s("fine"), field: value}) == {f"inputs.{field}": rule}


def test_descriptions_never_echo_submitted_values() -> None:
    secret = "SSN-123-45-6789-" * 300
    found = problems({"reason": s(secret), "priority": s("SSN-123-45-6789"), "count": i(987654321)})
    assert found
    for description in found.values():
        assert "SSN" not in description and "987654321" not in description


def test_a_custom_path_prefixes_violations() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_inputs(FIELDS, {}, path="request.inputs")
    assert [v.field for v in caught.value.violations] == ["request.inputs.reason"]


def test_too_many_inputs_and_the_violation_list_is_bounded() -> None:
    values = {f"extra_{k}": s("x") for k in range(MAX_INPUTS + 20)}
    values["reason"] = s("fine")
    with pytest.raises(InvalidArgument) as caught:
        validate_inputs(FIELDS, values)
    violations = caught.value.violations
    assert violations[0].field == "inputs"
    assert violations[0].description == f"must have at most {MAX_INPUTS} inputs"
    assert len(violations) == MAX_VIOLATIONS
    assert violations[-1].description.endswith("more problems not listed")


def test_garbled_unknown_names_are_not_echoed() -> None:
    found = problems({"reason": s("fine"), "Robert'); DROP TABLE": s("x"), "x" * 500: s("y")})
    assert found == {"inputs": "has input names that are not inputs of this action"}


def test_schema_problems_accepts_a_good_schema() -> None:
    assert schema_problems(FIELDS) == []


def test_schema_problems_reports_every_mistake() -> None:
    bad = [
        common_pb2.InputField(name="Reason", type=STRING),
        common_pb2.InputField(name="note", type=STRING),
        common_pb2.InputField(name="note", type=STRING),
        common_pb2.InputField(name="kind"),
        common_pb2.InputField(name="choice", type=ENUM),
        common_pb2.InputField(name="text", type=STRING, min_length=5, max_length=2),
        common_pb2.InputField(name="level", type=INTEGER, minimum=5, maximum=1),
        common_pb2.InputField(name="flag", type=BOOLEAN, min_length=1),
    ]
    found = schema_problems(bad)
    expected_fragments = [
        "'Reason': name must match",
        "'note': declared more than once",
        "'kind': type must be set",
        "'choice': ENUM inputs need allowed_values",
        "'text': min_length 5 > max_length 2",
        "'level': minimum 5 > maximum 1",
        "'flag': min_length/max_length apply to STRING inputs only",
    ]
    for fragment in expected_fragments:
        assert any(fragment in p for p in found), (fragment, found)
    assert len(found) == len(expected_fragments)


def test_schema_problems_limits_the_number_of_inputs() -> None:
    fields = [common_pb2.InputField(name=f"f{k}", type=BOOLEAN) for k in range(MAX_INPUTS + 1)]
    assert schema_problems(fields) == [
        f"an action may declare at most {MAX_INPUTS} inputs, not {MAX_INPUTS + 1}"
    ]
