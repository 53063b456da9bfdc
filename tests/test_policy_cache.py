"""The policy decision cache: fewer Cedar evaluations, never a different answer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from actionmesh.gateway import policy as policy_module
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.policy import UNVERIFIED, ActionSubject, Operation, PolicyEngine
from actionmesh.v1 import common_pb2

DEFAULT_POLICIES = Path(policy_module.__file__).parent / "policies" / "default.cedar"


@pytest.fixture
def engine(tmp_path: Path) -> PolicyEngine:
    path = tmp_path / "policies.cedar"
    shutil.copy(DEFAULT_POLICIES, path)
    return PolicyEngine(path)


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests reached Cedar, per call."""
    counted: list[int] = []
    real = cedarpy.is_authorized_batch

    def counting(requests: list[Any], *args: Any, **kwargs: Any) -> Any:
        counted.append(len(requests))
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", counting)
    return counted


def subject(action_id: str, risk: int = common_pb2.RISK_LOW) -> ActionSubject:
    return ActionSubject(
        action_id=action_id,
        provider_id="workitems",
        descriptor=common_pb2.ActionDescriptor(action_id=action_id, risk=risk),
    )


def record(sensitivity: int = common_pb2.SENSITIVITY_NORMAL) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(
        tenant="acme", type="workitem", id="wi-1", status="FAILED", sensitivity=sensitivity
    )


OPERATOR = Caller(subject="alice", tenant="acme", roles=("operator",))
# The record's system of record vouched for its facts (context.record.source).
VERIFIED = "provider"


def allowed(engine: PolicyEngine, *subjects: ActionSubject, **kwargs: Any) -> list[bool]:
    caller = kwargs.get("caller", OPERATOR)
    context = kwargs.get("record", record())
    source = kwargs.get("source", VERIFIED)
    decisions = engine.authorize(Operation.EXECUTE, caller, context, subjects, source=source)
    return [d.allowed for d in decisions]


def test_the_same_inputs_are_evaluated_once(engine: PolicyEngine, evaluations: list[int]) -> None:
    low, high = subject("workitem.retry"), subject("workitem.purge", common_pb2.RISK_HIGH)
    assert allowed(engine, low, high) == [True, False]
    assert allowed(engine, low, high) == [True, False]
    assert evaluations == [2]
    # A new subject alongside known ones: only the new one goes to Cedar.
    assert allowed(engine, low, subject("workitem.note"), high) == [True, True, False]
    assert evaluations == [2, 1]


def test_every_input_is_part_of_the_key(engine: PolicyEngine, evaluations: list[int]) -> None:
    retry = subject("workitem.retry")
    assert allowed(engine, retry) == [True]
    assert allowed(engine, retry, record=record(common_pb2.SENSITIVITY_SENSITIVE)) == [False]
    viewer = Caller(subject="alice", tenant="acme", roles=("viewer",))
    assert allowed(engine, retry, caller=viewer) == [False]
    supervisor = Caller(subject="alice", tenant="acme", roles=("supervisor",))
    assert allowed(
        engine, retry, caller=supervisor, record=record(common_pb2.SENSITIVITY_RESTRICTED)
    ) == [False]
    # Who vouched for the record's facts is an input too: nobody executes on unverified ones.
    assert allowed(engine, retry, source=UNVERIFIED) == [False]
    assert allowed(engine, retry, source="trusted_caller") == [True]
    assert evaluations == [1, 1, 1, 1, 1, 1]


def test_a_reloaded_policy_file_is_not_answered_from_the_cache(
    engine: PolicyEngine, evaluations: list[int]
) -> None:
    retry = subject("workitem.retry")
    assert allowed(engine, retry) == [True]
    engine.path.write_text(
        engine.path.read_text()
        + '\n@id("nobody-retries")\nforbid (principal, action, resource)'
        + ' when { resource.provider == "workitems" };\n'
    )
    assert engine.reload_if_changed() is True
    decisions = engine.authorize(Operation.EXECUTE, OPERATOR, record(), [retry], source=VERIFIED)
    assert [d.allowed for d in decisions] == [False]
    assert decisions[0].policy_ids == ("nobody-retries",)
    assert evaluations == [1, 1]
