"""The workitems example provider, served for real, with its SQLite state read directly."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from actionmesh.providers.workitems import InboundEmail, WorkItem, WorkItemStore, workitems
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.rpc.telemetry import configure_tracing
from actionmesh.sdk import ProviderConfig, start_provider
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
ALICE = common_pb2.Operator(subject="alice", tenant="acme", roles=["operator"])


def record(
    item_id: str, status: str = "failed", tenant: str = "acme", **attributes: str
) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(
        tenant=tenant, type="workitem", id=item_id, status=status, attributes=attributes
    )


def retry(
    item_id: str,
    *,
    key: str,
    status: str = "failed",
    operator: common_pb2.Operator = ALICE,
    reason: str = "parser fixed upstream",
    priority: str | None = None,
) -> provider_pb2.ExecuteRequest:
    inputs = {"reason": common_pb2.InputValue(string_value=reason)}
    if priority is not None:
        inputs["priority"] = common_pb2.InputValue(string_value=priority)
    return provider_pb2.ExecuteRequest(
        action_id="workitem.retry",
        record=record(item_id, status, operator.tenant),
        operator=operator,
        inputs=inputs,
        idempotency_key=key,
        request_id=f"req-{key}",
    )


@dataclass
class Served:
    server: RunningServer
    stub: provider_pb2_grpc.ActionProviderServiceStub
    store: WorkItemStore
    config: ProviderConfig


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The workitems provider with its demo data, and a second handle on its SQLite file."""
    configure_tracing("test-workitems")
    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path), seed_demo=True)
    server = await start_provider(workitems, config)
    store = WorkItemStore.open(config.database_url_for(workitems.id))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Served(
                server, provider_pb2_grpc.ActionProviderServiceStub(channel), store, config
            )
    finally:
        store.close()
        await server.stop(1.0)


async def execute(
    served: Served, request: provider_pb2.ExecuteRequest
) -> provider_pb2.ExecuteResponse:
    return await served.stub.Execute(request, timeout=5)


async def test_demo_data_is_seeded_into_its_own_database(served: Served) -> None:
    assert await asyncio.to_thread(Path(served.config.data_dir, "workitems.db").exists)
    wi = served.store.get("acme", "wi-1001")
    assert wi is not None
    assert (wi.kind, wi.status, wi.attempts, wi.max_attempts, wi.last_error) == (
        "inbound_email",
        "failed",
        1,
        3,
        "mail parser timeout",
    )
    statuses = {
        (t, i): served.store.get(t, i).status  # type: ignore[union-attr]
        for t, i in [("acme", "wi-1002"), ("acme", "wi-1003"), ("globex", "wi-2001")]
    }
    assert statuses == {
        ("acme", "wi-1002"): "stuck",
        ("acme", "wi-1003"): "processed",
        ("globex", "wi-2001"): "failed",
    }
    assert served.store.get("acme", "wi-2001") is None  # tenants do not share items


async def test_discovery_follows_the_record_status(served: Served) -> None:
    async def discover(rec: common_pb2.RecordContext) -> list[tuple[str, bool, str]]:
        reply = await served.stub.Discover(
            provider_pb2.DiscoverRequest(record=rec, operator=ALICE), timeout=5
        )
        return [(a.action_id, a.available, a.unavailable_reason) for a in reply.actions]

    assert await discover(record("wi-1001", "failed")) == [
        ("workitem.retry", True, ""),
        ("workitem.reprocess_email", True, ""),
    ]
    assert await discover(record("wi-1004", "stuck", kind="inbound_email")) == [
        ("workitem.retry", True, ""),
        ("workitem.reprocess_email", True, ""),
    ]
    # With the kind in the caller's context, only emails are offered for reprocessing.
    assert await discover(record("wi-1002", "stuck", kind="customer_update")) == [
        ("workitem.retry", True, ""),
        ("workitem.reprocess_email", False, "NOT_INBOUND_EMAIL"),
    ]
    assert await discover(record("wi-1003", "processed")) == [
        ("workitem.retry", False, "STATUS_NOT_FAILED"),
        ("workitem.reprocess_email", False, "STATUS_NOT_FAILED"),
    ]
    other = common_pb2.RecordContext(tenant="acme", type="invoice", id="inv-1", status="failed")
    assert await discover(other) == []


async def test_describe_declares_the_retry_schema(served: Served) -> None:
    reply = await served.stub.Describe(provider_pb2.DescribeRequest(), timeout=5)
    assert [a.action_id for a in reply.actions] == ["workitem.retry", "workitem.reprocess_email"]
    action = reply.actions[0]
    assert (reply.provider_id, reply.version, action.action_id) == (
        "workitems",
        "1.0.0",
        "workitem.retry",
    )
    assert (action.risk, action.reversible, action.requires_approval, action.timeout_ms) == (
        common_pb2.RISK_LOW,
        False,
        False,
        5000,
    )
    reason, priority = action.inputs
    assert (reason.name, reason.required, reason.min_length, reason.max_length) == (
        "reason",
        True,
        3,
        200,
    )
    assert (priority.name, priority.required, list(priority.allowed_values)) == (
        "priority",
        False,
        ["low", "normal", "high"],
    )


async def test_retry_reprocesses_the_item_and_logs_the_attempt(served: Served) -> None:
    reply = await execute(served, retry("wi-1001", key="k-1", priority="high"))
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert reply.external_ref == "wi-1001/attempt-2"
    assert [(c.field, c.before, c.after) for c in reply.changes] == [
        ("status", "failed", "processed"),
        ("attempts", "1", "2"),
    ]
    assert list(reply.warnings) == []

    item = served.store.get("acme", "wi-1001")
    assert item is not None
    assert (item.status, item.attempts, item.last_error) == ("processed", 2, "")
    (attempt,) = served.store.attempts("acme", "wi-1001")
    assert (attempt.attempt, attempt.status_before, attempt.status_after) == (
        2,
        "failed",
        "processed",
    )
    assert (attempt.request_id, attempt.idempotency_key, attempt.action_id, attempt.actor) == (
        "req-k-1",
        "k-1",
        "workitem.retry",
        "alice",
    )
    assert (attempt.priority, attempt.reason) == ("high", "parser fixed upstream")
    assert len(attempt.trace_id) == 32 and int(attempt.trace_id, 16) != 0
    assert abs(time.time() - attempt.at.timestamp()) < 60


async def test_a_second_retry_is_rejected_because_the_item_is_processed(served: Served) -> None:
    await execute(served, retry("wi-1001", key="k-1"))
    # The caller's view is stale ("failed"): the provider re-checks its own state.
    again = await execute(served, retry("wi-1001", key="k-2"))
    assert (again.outcome, again.reason) == (common_pb2.OUTCOME_REJECTED, "NOT_FAILED")
    assert list(again.changes) == []
    item = served.store.get("acme", "wi-1001")
    assert item is not None and item.attempts == 2
    assert len(served.store.attempts("acme", "wi-1001")) == 1


async def test_a_repeated_idempotency_key_does_not_retry_twice(served: Served) -> None:
    first = await execute(served, retry("wi-1002", key="same", status="stuck"))
    second = await execute(served, retry("wi-1002", key="same", status="stuck"))
    assert first == second
    assert first.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert (first.changes[0].field, first.changes[0].before, first.changes[0].after) == (
        "status",
        "stuck",
        "processed",
    )
    assert len(served.store.attempts("acme", "wi-1002")) == 1


async def test_concurrent_retries_with_different_keys_succeed_once(served: Served) -> None:
    replies = await asyncio.gather(
        *(execute(served, retry("wi-1001", key=f"c-{n}")) for n in range(8))
    )
    outcomes = sorted(common_pb2.Outcome.Name(r.outcome) for r in replies)
    assert outcomes == ["OUTCOME_REJECTED"] * 7 + ["OUTCOME_SUCCEEDED"]
    assert {r.reason for r in replies if r.outcome == common_pb2.OUTCOME_REJECTED} == {"NOT_FAILED"}
    assert len(served.store.attempts("acme", "wi-1001")) == 1


async def test_max_attempts(served: Served) -> None:
    served.store.put(WorkItem("acme", "wi-3001", "customer_update", "failed", attempts=3))
    served.store.put(WorkItem("acme", "wi-3002", "customer_update", "failed", attempts=2))

    spent = await execute(served, retry("wi-3001", key="m-1"))
    assert (spent.outcome, spent.reason) == (common_pb2.OUTCOME_REJECTED, "MAX_ATTEMPTS_REACHED")
    item = served.store.get("acme", "wi-3001")
    assert item is not None and (item.status, item.attempts) == ("failed", 3)

    last = await execute(served, retry("wi-3002", key="m-2"))
    assert last.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert last.external_ref == "wi-3002/attempt-3"
    assert list(last.warnings) == ["This was the last allowed attempt for this work item."]


async def test_items_of_another_tenant_are_unknown(served: Served) -> None:
    bob = common_pb2.Operator(subject="bob", tenant="globex", roles=["operator"])
    reply = await execute(served, retry("wi-1001", key="t-1", operator=bob))
    assert (reply.outcome, reply.reason) == (common_pb2.OUTCOME_REJECTED, "UNKNOWN_ITEM")
    item = served.store.get("acme", "wi-1001")
    assert item is not None and item.status == "failed"

    own = await execute(served, retry("wi-2001", key="t-2", operator=bob))
    assert own.outcome == common_pb2.OUTCOME_SUCCEEDED


async def test_invalid_inputs_are_refused_and_change_nothing(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(served, retry("wi-1001", key="v-1", reason="ok", priority="urgent"))
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field: v.description for v in details.violations} == {
        "inputs.reason": "must be at least 3 characters",
        "inputs.priority": "must be one of: low, normal, high",
    }
    item = served.store.get("acme", "wi-1001")
    assert item is not None and item.status == "failed"


# -- reprocessing a stuck inbound email into a ticket --------------------------------


def reprocess(
    item_id: str,
    *,
    key: str,
    status: str = "stuck",
    reason: str = "routing rules restored",
    queue: str | None = None,
) -> provider_pb2.ExecuteRequest:
    inputs = {"reason": common_pb2.InputValue(string_value=reason)}
    if queue is not None:
        inputs["queue"] = common_pb2.InputValue(string_value=queue)
    return provider_pb2.ExecuteRequest(
        action_id="workitem.reprocess_email",
        record=record(item_id, status),
        operator=ALICE,
        inputs=inputs,
        idempotency_key=key,
        request_id=f"req-{key}",
    )


async def test_describe_declares_the_reprocess_email_schema(served: Served) -> None:
    reply = await served.stub.Describe(provider_pb2.DescribeRequest(), timeout=5)
    action = {a.action_id: a for a in reply.actions}["workitem.reprocess_email"]
    assert (action.risk, action.reversible, action.requires_approval, action.timeout_ms) == (
        common_pb2.RISK_LOW,
        False,
        False,
        5000,
    )
    assert [(f.name, f.required, list(f.allowed_values)) for f in action.inputs] == [
        ("reason", True, []),
        ("queue", False, ["support", "billing", "technical"]),
    ]


async def test_reprocess_email_creates_a_ticket_and_records_before_and_after(
    served: Served,
) -> None:
    reply = await execute(served, reprocess("wi-1004", key="e-1", queue="technical"))
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    (ticket,) = served.store.tickets("acme", "wi-1004")
    assert reply.external_ref == ticket.ticket_id
    assert ticket.ticket_id.startswith("t-")
    assert (ticket.queue, ticket.sender, ticket.subject, ticket.attempt) == (
        "technical",
        "dana@acme.example",
        "Cannot log in to the portal",
        2,
    )
    assert [(c.field, c.before, c.after) for c in reply.changes] == [
        ("status", "stuck", "processed"),
        ("attempts", "1", "2"),
        ("ticket", "", ticket.ticket_id),
    ]
    assert ticket.ticket_id in reply.message and list(reply.warnings) == []

    item = served.store.get("acme", "wi-1004")
    assert item is not None and (item.status, item.attempts, item.last_error) == (
        "processed",
        2,
        "",
    )
    (attempt,) = served.store.attempts("acme", "wi-1004")
    assert (attempt.action_id, attempt.status_before, attempt.status_after, attempt.actor) == (
        "workitem.reprocess_email",
        "stuck",
        "processed",
        "alice",
    )
    assert attempt.reason == "routing rules restored"

    # Processed now: a second reprocess (stale caller view) is refused and creates nothing.
    again = await execute(served, reprocess("wi-1004", key="e-2"))
    assert (again.outcome, again.reason) == (common_pb2.OUTCOME_REJECTED, "NOT_FAILED")
    assert len(served.store.tickets("acme", "wi-1004")) == 1


async def test_reprocess_email_with_a_repeated_key_creates_one_ticket(served: Served) -> None:
    first = await execute(served, reprocess("wi-1001", key="same", status="failed"))
    second = await execute(served, reprocess("wi-1001", key="same", status="failed"))
    assert first == second and first.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert [t.ticket_id for t in served.store.tickets("acme", "wi-1001")] == [first.external_ref]
    assert len(served.store.attempts("acme", "wi-1001")) == 1


async def test_reprocess_email_refuses_what_is_not_a_stuck_email(served: Served) -> None:
    # The caller claims nothing about the kind; the provider checks its own store.
    update = await execute(served, reprocess("wi-1002", key="r-1"))
    assert (update.outcome, update.reason) == (common_pb2.OUTCOME_REJECTED, "NOT_INBOUND_EMAIL")
    processed = await execute(served, reprocess("wi-1003", key="r-2", status="failed"))
    assert (processed.outcome, processed.reason) == (common_pb2.OUTCOME_REJECTED, "NOT_FAILED")
    served.store.put(WorkItem("acme", "wi-3003", "inbound_email", "failed", attempts=1))
    lost = await execute(served, reprocess("wi-3003", key="r-3", status="failed"))
    assert (lost.outcome, lost.reason) == (common_pb2.OUTCOME_REJECTED, "EMAIL_MISSING")

    for tenant, item_id, status in (
        ("acme", "wi-1002", "stuck"),
        ("acme", "wi-1003", "processed"),
        ("acme", "wi-3003", "failed"),
    ):
        item = served.store.get(tenant, item_id)
        assert item is not None and item.status == status
        assert served.store.tickets(tenant, item_id) == []
        assert served.store.attempts(tenant, item_id) == []


async def test_reprocess_and_retry_share_the_attempt_budget(served: Served) -> None:
    spent = await execute(served, reprocess("wi-1005", key="b-1", status="failed"))
    assert (spent.outcome, spent.reason) == (common_pb2.OUTCOME_REJECTED, "MAX_ATTEMPTS_REACHED")
    assert served.store.tickets("acme", "wi-1005") == []

    served.store.put(WorkItem("acme", "wi-3004", "inbound_email", "failed", attempts=2))
    served.store.put_email(InboundEmail("acme", "wi-3004", "kim@acme.example", "Refund request"))
    last = await execute(served, reprocess("wi-3004", key="b-2", status="failed"))
    assert last.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert list(last.warnings) == ["This was the last allowed attempt for this work item."]

    # It fails again downstream: neither action has an attempt left.
    item = served.store.get("acme", "wi-3004")
    assert item is not None and item.attempts == 3
    served.store.put(replace(item, status="failed"))
    for request in (
        reprocess("wi-3004", key="b-3", status="failed"),
        retry("wi-3004", key="b-4"),
    ):
        reply = await execute(served, request)
        assert (reply.outcome, reply.reason) == (
            common_pb2.OUTCOME_REJECTED,
            "MAX_ATTEMPTS_REACHED",
        )
    assert len(served.store.tickets("acme", "wi-3004")) == 1


async def test_seeding_again_keeps_existing_state(tmp_path: Path) -> None:
    store = WorkItemStore.open(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        assert store.seed_demo() == 7
        store.put(WorkItem("acme", "wi-1001", "inbound_email", "processed", attempts=2))
        assert store.seed_demo() == 0
        item = store.get("acme", "wi-1001")
        assert item is not None and (item.status, item.attempts) == ("processed", 2)
    finally:
        store.close()


# -- the binary ------------------------------------------------------------------

HAS_REGISTRY = importlib.util.find_spec("actionmesh.registry.server") is not None


async def wait_for_ready(
    path: Path, process: asyncio.subprocess.Process, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(path.exists):
        if process.returncode is not None:
            raise AssertionError(f"provider exited early with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("provider did not become ready")
        await asyncio.sleep(0.05)
    info: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
    return info


async def stop_process(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), timeout=15)


async def test_the_binary_serves_registers_and_deregisters_on_sigterm(tmp_path: Path) -> None:
    registry = None
    registry_address = ""
    if HAS_REGISTRY:
        from actionmesh.registry.config import RegistryConfig
        from actionmesh.registry.server import start_registry
        from actionmesh.runtime.db import sqlite_url

        registry = await start_registry(
            RegistryConfig(
                port=0,
                database_url=sqlite_url(tmp_path / "registry.db"),
                lease_ttl_s=5.0,
                health_check_interval_s=0.3,
            )
        )
        registry_address = registry.address
    ready = tmp_path / "ready.json"
    command = [
        sys.executable,
        "-m",
        "actionmesh.providers.workitems",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--ready-file",
        str(ready),
        "--seed-demo",
        "true",
    ]
    if registry_address:
        command += ["--registry", registry_address]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, env={**os.environ, "ACTIONMESH_LOG_LEVEL": "WARNING"}
    )
    try:
        info = await wait_for_ready(ready, process, timeout_s=20)
        async with grpc.aio.insecure_channel(info["address"]) as channel:
            stub = provider_pb2_grpc.ActionProviderServiceStub(channel)
            reply = await stub.Execute(retry("wi-1001", key="bin-1"), timeout=5)
            assert reply.external_ref == "wi-1001/attempt-2"

        if registry is not None:
            from actionmesh.v1 import registry_pb2, registry_pb2_grpc

            async with grpc.aio.insecure_channel(registry.address) as channel:
                reg = registry_pb2_grpc.RegistryServiceStub(channel)

                async def endpoints() -> list[str]:
                    found = await reg.ListProviders(registry_pb2.ListProvidersRequest(), timeout=5)
                    return [p.endpoint for p in found.providers if p.provider_id == "workitems"]

                deadline = time.monotonic() + 10
                while await endpoints() != [f"127.0.0.1:{info['port']}"]:
                    assert time.monotonic() < deadline, "provider never registered"
                    await asyncio.sleep(0.05)

                assert await stop_process(process) == 0
                # Gone at once: deregistered, not left to expire (lease ttl is 5s).
                assert await endpoints() == []
        else:
            assert await stop_process(process) == 0

        store = WorkItemStore.open(f"sqlite:///{tmp_path / 'data' / 'workitems.db'}")
        try:
            item = store.get("acme", "wi-1001")
            assert item is not None and (item.status, item.attempts) == ("processed", 2)
        finally:
            store.close()
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), timeout=5)
        if registry is not None:
            await registry.stop(0.5)
