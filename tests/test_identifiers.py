"""One verdict per identifier everywhere: the same hostile action ids and record types
are fed to the registry (a registration), the gateway (an execute request), the SDK
(an action declaration) and the stand-in support platform (an escalation), and each
accepts or refuses exactly what the contract's rule (actionmesh.rpc.identifiers) does.

Issue 16 found the copies drifted: the registry accepted ``"workitem.retry\\n"``, which
the gateway then refused, an action that could be registered but never run.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from actionmesh.gateway.requests import execute_violations
from actionmesh.providers.supportdesk.api import ApiError, parse_create
from actionmesh.registry.model import Registration
from actionmesh.registry.validation import validate_registration
from actionmesh.rpc.errors import InvalidArgument
from actionmesh.rpc.identifiers import ACTION_ID, RECORD_TYPE, RULES
from actionmesh.sdk import ActionContext, NoInputs, Provider, ProviderDefinitionError, Result
from actionmesh.v1 import common_pb2

CYRILLIC_E = "\u0435"  # looks like "e"
HOSTILE_ACTION_IDS = [
    "workitem.retry",  # the valid one
    "workitem.retry\n",
    "workitem.retry\r\n",
    f"workit{CYRILLIC_E}m.retry",
    "workitem.retr\u0443",  # Cyrillic u
    "workitem..retry",
    ".retry",
    "workitem.",
    "workitem",
    "",
    "WorkItem.retry",
    "workitem.retry ",
    "workitem.re\x00try",
    "w" * 120 + ".retry",  # 126: fits
    "w" * 130 + ".retry",  # overlong
    "workitem.\uff52etry",  # full-width r
]
HOSTILE_RECORD_TYPES = [
    "workitem",
    "workitem\n",
    f"workit{CYRILLIC_E}m",
    "",
    "Workitem",
    "9workitem",
    "x" * 64,
    "x" * 65,
    "work item",
    "ticket\t",
]


def registry_accepts(action_id: str = "workitem.retry", record_type: str = "workitem") -> bool:
    action = common_pb2.ActionDescriptor(
        action_id=action_id, label="Retry", record_types=[record_type]
    )
    try:
        validate_registration(Registration("workitems", "127.0.0.1:50061", "1.0", (action,)))
    except InvalidArgument:
        return False
    return True


def gateway_accepts(action_id: str = "workitem.retry", record_type: str = "workitem") -> bool:
    record = common_pb2.RecordContext(tenant="acme", type=record_type, id="wi-1", status="failed")
    problems = execute_violations(action_id, record, True, "key-1", {})
    return not [p for p in problems if p.field in ("action_id", "record.type")]


def sdk_accepts(action_id: str = "workitem.retry", record_type: str = "workitem") -> bool:
    provider = Provider("workitems", version="1.0")
    try:

        @provider.action(action_id, label="Retry", record_types=[record_type])
        async def retry(ctx: ActionContext, inputs: NoInputs) -> Result:
            return Result.succeeded()

    except ProviderDefinitionError:
        return False
    return True


def supportdesk_accepts(record_type: str) -> bool:
    body: dict[str, Any] = {
        "tenant": "acme",
        "source": {"type": record_type, "id": "t-1"},
        "summary": "customer cannot log in",
        "severity": "high",
        "requested_by": "alice",
    }
    try:
        parse_create(json.dumps(body).encode())
    except ApiError as error:
        assert "source.type" in {field for field, _ in error.fields}, error.fields
        return False
    return True


@pytest.mark.parametrize("action_id", HOSTILE_ACTION_IDS, ids=repr)
def test_every_service_judges_an_action_id_as_the_rule_does(action_id: str) -> None:
    expected = ACTION_ID.valid(action_id)
    verdicts = {
        "registry": registry_accepts(action_id=action_id),
        "gateway": gateway_accepts(action_id=action_id),
        "sdk": sdk_accepts(action_id=action_id),
    }
    assert verdicts == dict.fromkeys(verdicts, expected)


@pytest.mark.parametrize("record_type", HOSTILE_RECORD_TYPES, ids=repr)
def test_every_service_judges_a_record_type_as_the_rule_does(record_type: str) -> None:
    expected = RECORD_TYPE.valid(record_type)
    verdicts = {
        "registry": registry_accepts(record_type=record_type),
        "gateway": gateway_accepts(record_type=record_type),
        "sdk": sdk_accepts(record_type=record_type),
        "supportdesk": supportdesk_accepts(record_type),
    }
    assert verdicts == dict.fromkeys(verdicts, expected)


def test_the_rules_refuse_newlines_look_alikes_and_overlong_values() -> None:
    for rule in RULES:
        assert rule.valid(rule.example)
        assert not rule.valid(rule.example + "\n")
        assert not rule.valid("")
        assert not rule.valid(rule.example[0] * (rule.max_length + 1))
        assert not rule.valid(None)
    assert ACTION_ID.valid("workitem.retry") and not ACTION_ID.valid("workitem.retr\u0443")
