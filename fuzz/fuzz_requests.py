"""Fuzz target: the gateway's request validator, as ExecuteAction and DiscoverActions use it.

The bytes are decoded as an ``ExecuteActionRequest`` and as a
``DiscoverActionsRequest`` and go through the same checks the gateway runs
before anything else looks at a request: :func:`gateway.requests.execute_violations`
(size and shape limits), then, when those pass, the action's schema
(:func:`actionmesh.rpc.schema.validate_inputs` against a schema with every input type).

A crash is any of: an exception other than a refusal (``InvalidArgument``); a
refusal whose details could not travel in a gRPC trailer or could carry a
submitted value (a field path outside the fixed grammar, an over-long or
control-character description); or a request the validator passed that breaks a
limit it promises. Run ``python fuzz/fuzz_requests.py -runs=100000`` (see README).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
if HAVE_ATHERIS and __name__ == "__main__":
    import atheris

    # Coverage feedback from the code under test only: instrumenting every loaded
    # module (atheris.instrument_all) takes minutes and steers the fuzzer into grpc.
    _instrumented: Any = atheris.instrument_imports(include=["actionmesh"])
else:
    _instrumented = contextlib.nullcontext()
with _instrumented:
    from actionmesh.gateway import requests
    from actionmesh.rpc.errors import FieldViolation, InvalidArgument
    from actionmesh.rpc.schema import validate_inputs
    from actionmesh.v1 import common_pb2, gateway_pb2

STRING = common_pb2.INPUT_TYPE_STRING
SCHEMA = (
    common_pb2.InputField(name="reason", type=STRING, required=True, min_length=5, max_length=200),
    common_pb2.InputField(
        name="priority",
        type=common_pb2.INPUT_TYPE_ENUM,
        allowed_values=["low", "normal", "urgent"],
    ),
    common_pb2.InputField(
        name="attempts", type=common_pb2.INPUT_TYPE_INTEGER, minimum=0, maximum=10
    ),
    common_pb2.InputField(name="ratio", type=common_pb2.INPUT_TYPE_NUMBER, minimum=0.0),
    common_pb2.InputField(name="force", type=common_pb2.INPUT_TYPE_BOOLEAN),
    common_pb2.InputField(name="note", type=STRING),
)

# Every field path a refusal may name: fixed names, or names that passed their pattern.
FIELD_PATH = re.compile(
    r"(action_id|idempotency_key"
    r"|record(\.(tenant|type|id|status|sensitivity|version"
    r"|attributes(\[[A-Za-z][A-Za-z0-9_.-]{0,63}\])?))?"
    r"|inputs(\.[a-z][a-z0-9_]{0,63})?)"
)
# What a refusal may hold and still fit a gRPC trailer (8 KiB) with room to spare.
MAX_FIELD_CHARS = 100
MAX_DESCRIPTION_CHARS = 200
MAX_TOTAL_CHARS = 3500
MAX_VIOLATIONS = 40
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_refusal(violations: Sequence[FieldViolation]) -> None:
    """A refusal names known fields, states rules, and stays deliverable."""
    assert violations, "a refusal without field violations"
    assert len(violations) <= MAX_VIOLATIONS, f"{len(violations)} violations"
    total = 0
    for violation in violations:
        assert FIELD_PATH.fullmatch(violation.field), f"unexpected field {violation.field!r}"
        assert len(violation.field) <= MAX_FIELD_CHARS, violation.field
        assert 0 < len(violation.description) <= MAX_DESCRIPTION_CHARS, violation.description
        assert not CONTROL.search(violation.description), violation.description
        total += len(violation.field) + len(violation.description)
    assert total <= MAX_TOTAL_CHARS, f"{total} characters of violations"


def check_record_passed(record: common_pb2.RecordContext) -> None:
    """What a record that passed the checks is guaranteed to be."""
    assert 0 < len(record.tenant) <= requests.MAX_TENANT
    assert requests.RECORD_TYPE.valid(record.type)
    assert requests.RECORD_ID.valid(record.id)
    assert len(record.status) <= requests.MAX_STATUS
    assert len(record.version) <= requests.MAX_VERSION
    assert record.sensitivity in common_pb2.Sensitivity.values()
    assert len(record.attributes) <= requests.MAX_ATTRIBUTES
    for key, value in record.attributes.items():
        assert requests.ATTRIBUTE_KEY.valid(key)
        assert len(value) <= requests.MAX_ATTRIBUTE_VALUE and "\x00" not in value
    for text in (record.tenant, record.status, record.version):
        assert not CONTROL.search(text)


def check_execute(data: bytes) -> None:
    try:
        request = gateway_pb2.ExecuteActionRequest.FromString(data)
    except DecodeError:
        return  # the gRPC server refuses these with INVALID_ARGUMENT before any check
    has_record = request.HasField("record")
    problems = requests.execute_violations(
        request.action_id, request.record, has_record, request.idempotency_key, request.inputs
    )
    if problems:
        check_refusal(problems)
        return
    assert len(request.action_id) <= requests.MAX_ACTION_ID
    assert requests.ACTION_ID.valid(request.action_id)
    assert requests.IDEMPOTENCY_KEY.valid(request.idempotency_key)
    check_record_passed(request.record)
    assert len(request.inputs) <= requests.MAX_INPUTS
    for name, value in request.inputs.items():
        assert len(name) <= requests.MAX_INPUT_NAME
        if value.WhichOneof("kind") == "string_value":
            assert len(value.string_value) <= requests.MAX_STRING_CHARS
            assert "\x00" not in value.string_value
    try:
        checked = validate_inputs(SCHEMA, request.inputs)
    except InvalidArgument as refusal:
        assert refusal.reason == "INVALID_INPUT"
        check_refusal(refusal.violations)
        return
    assert set(checked) <= {field.name for field in SCHEMA}


def check_discover(data: bytes) -> None:
    try:
        request = gateway_pb2.DiscoverActionsRequest.FromString(data)
    except DecodeError:
        return
    try:
        requests.check_record(request.record, request.HasField("record"))
    except InvalidArgument as refusal:
        assert refusal.reason == "INVALID_RECORD"
        check_refusal(refusal.violations)
        return
    check_record_passed(request.record)


def _text(fdp: Any, choices: Sequence[str]) -> str:
    """A known good value, a random string, or a long run of one character."""
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0 and choices:
        return choices[fdp.ConsumeIntInRange(0, len(choices) - 1)]
    if mode == 3:
        return fdp.ConsumeUnicodeNoSurrogates(1) * fdp.ConsumeIntInRange(0, 5000)
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80)))


def build_request(fdp: Any) -> gateway_pb2.ExecuteActionRequest:
    """A request assembled field by field, so mutations reach the validator, not the decoder."""
    request = gateway_pb2.ExecuteActionRequest(
        action_id=_text(fdp, ["workitem.retry", "a.b", "ticket.link"]),
        idempotency_key=_text(fdp, ["k-1", "2f1c:9"]),
    )
    if fdp.ConsumeBool():
        record = request.record
        record.tenant = _text(fdp, ["acme", "globex"])
        record.type = _text(fdp, ["workitem", "ticket"])
        record.id = _text(fdp, ["wi-1001", "a/b:c.d_e"])
        record.status = _text(fdp, ["failed", "in progress"])
        record.version = _text(fdp, ["7", "etag-1"])
        record.sensitivity = fdp.ConsumeIntInRange(-2, 6)
        for _ in range(fdp.ConsumeIntInRange(0, 20)):
            record.attributes[_text(fdp, ["queue", "region.x"])] = _text(fdp, ["billing"])
    names = [field.name for field in SCHEMA]
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        value = request.inputs[_text(fdp, names)]
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind == 0:
            value.string_value = _text(fdp, ["mail parser fixed", "urgent", "low"])
        elif kind == 1:
            value.integer_value = fdp.ConsumeInt(8)
        elif kind == 2:
            value.number_value = fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else float("nan")
        elif kind == 3:
            value.bool_value = fdp.ConsumeBool()
        # kind 4: a value with no kind set
    return request


def fuzz_one_input(data: bytes) -> None:
    """One fuzz input: raises (AssertionError or anything unexpected) on a finding.

    An even first byte feeds the rest to the protobuf decoder as is; an odd one
    builds a request field by field from it (structure-aware fuzzing, which needs
    atheris's FuzzedDataProvider; without atheris every input is fed as is).
    """
    if not data:
        return
    if data[0] % 2 == 0 or not HAVE_ATHERIS:
        payload = data[1:]
    else:
        import atheris

        payload = build_request(atheris.FuzzedDataProvider(data[1:])).SerializeToString()
    check_execute(payload)
    check_discover(payload)


def seeds() -> list[bytes]:
    """Valid and nearly valid requests, so the fuzzer starts past the decoder."""
    record = common_pb2.RecordContext(
        tenant="acme",
        type="workitem",
        id="wi-1001",
        status="failed",
        attributes={"queue": "billing"},
        version="7",
    )
    valid = gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=record,
        inputs={
            "reason": common_pb2.InputValue(string_value="mail parser fixed"),
            "priority": common_pb2.InputValue(string_value="urgent"),
            "attempts": common_pb2.InputValue(integer_value=3),
            "ratio": common_pb2.InputValue(number_value=0.5),
            "force": common_pb2.InputValue(bool_value=True),
        },
        idempotency_key="k-1",
    )
    return [
        valid.SerializeToString(),
        gateway_pb2.DiscoverActionsRequest(record=record).SerializeToString(),
        gateway_pb2.ExecuteActionRequest(action_id="x", idempotency_key="").SerializeToString(),
    ]


def main(argv: list[str]) -> None:
    import atheris

    if not any(Path(arg).is_dir() for arg in argv[1:] if not arg.startswith("-")):
        # No corpus given: start from the seeds rather than from nothing, in a corpus
        # directory kept between runs (libFuzzer adds what it finds there).
        corpus = Path(tempfile.gettempdir()) / "actionmesh-fuzz" / "requests"
        corpus.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds()):
            (corpus / f"seed-{index}").write_bytes(b"\x00" + seed)
        argv = [*argv, str(corpus)]
    atheris.Setup(argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
