"""The records provider, served for real, with its SQLite state read directly; then once
through a real mesh (registry, audit log, gateway, provider as processes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import grpc
import grpc.aio
import pytest

from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.providers.records import RecordStore, records
from actionmesh.providers.records.store import Refused, Who
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.rpc.telemetry import configure_tracing
from actionmesh.sdk import ProviderConfig, start_provider
from actionmesh.v1 import (
    audit_pb2,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    provider_pb2,
    provider_pb2_grpc,
)
from tests.conftest import TEST_MESH, bearer, eventually
from tests.provider_state import ticket_state

pytestmark = pytest.mark.timeout(90)

ALICE = common_pb2.Operator(subject="alice", tenant="acme", roles=["operator"])
GINA = common_pb2.Operator(subject="gina", tenant="globex", roles=["operator"])
ACTIONS = [
    "ticket.update_routing",
    "ticket.change_service_level",
    "ticket.link",
    "ticket.unlink",
    "ticket.undo",
    "ticket.undo_service_level",
]


def ticket(ticket_id: str, status: str = "open", tenant: str = "acme") -> common_pb2.RecordContext:
    return common_pb2.RecordContext(tenant=tenant, type="ticket", id=ticket_id, status=status)


def as_input(value: str) -> common_pb2.InputValue:
    return common_pb2.InputValue(string_value=value)


def request(
    action: str,
    ticket_id: str = "t-100",
    *,
    key: str | None = None,
    status: str = "open",
    operator: common_pb2.Operator = ALICE,
    **inputs: str,
) -> provider_pb2.ExecuteRequest:
    key = key or uuid.uuid4().hex
    return provider_pb2.ExecuteRequest(
        action_id=action,
        record=ticket(ticket_id, status, operator.tenant),
        operator=operator,
        inputs={
            "reason": as_input("customer asked for it"),
            **{name: as_input(value) for name, value in inputs.items()},
        },
        idempotency_key=key,
        request_id=f"req-{key}",
    )


@dataclass
class Served:
    server: RunningServer
    stub: provider_pb2_grpc.ActionProviderServiceStub
    store: RecordStore
    config: ProviderConfig

    async def execute(self, req: provider_pb2.ExecuteRequest) -> provider_pb2.ExecuteResponse:
        return await self.stub.Execute(req, timeout=5)

    async def invalid(self, req: provider_pb2.ExecuteRequest) -> dict[str, str]:
        """Execute a request that must be INVALID_ARGUMENT; its field violations."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.execute(req)
        details = error_details(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
        return {v.field: v.description for v in details.violations}

    def routing(self, ticket_id: str = "t-100", tenant: str = "acme") -> tuple[str, str, str]:
        found = self.store.get(tenant, ticket_id)
        assert found is not None
        return found.queue, found.priority, found.service_level


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The records provider with its demo data, and a second handle on its SQLite file."""
    configure_tracing("test-records")
    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path), seed_demo=True)
    server = await start_provider(records, config)
    store = RecordStore.open(config.database_url_for(records.id))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Served(
                server, provider_pb2_grpc.ActionProviderServiceStub(channel), store, config
            )
    finally:
        store.close()
        await server.stop(1.0)


def outcome(reply: provider_pb2.ExecuteResponse) -> tuple[str, str]:
    return common_pb2.Outcome.Name(reply.outcome), reply.reason


SUCCEEDED = ("OUTCOME_SUCCEEDED", "")


def rejected(reason: str) -> tuple[str, str]:
    return "OUTCOME_REJECTED", reason


# -- declarations and discovery ---------------------------------------------------


async def test_demo_data_is_seeded_into_its_own_database(served: Served) -> None:
    assert await asyncio.to_thread(Path(served.config.data_dir, "records.db").exists)
    assert served.routing("t-100") == ("support", "normal", "standard")
    closed = served.store.get("acme", "t-103")
    assert closed is not None and closed.status == "closed"
    assert served.store.links("acme", "t-101") == [("customer", "c-100")]
    assert served.store.get("globex", "t-200") is not None
    assert served.store.get("globex", "t-100") is None  # tenants do not share tickets


async def test_describe_declares_risk_reversibility_and_approval(served: Served) -> None:
    reply = await served.stub.Describe(provider_pb2.DescribeRequest(), timeout=5)
    assert (reply.provider_id, reply.version) == ("records", "1.0.0")
    flags = {
        a.action_id: (common_pb2.Risk.Name(a.risk), a.reversible, a.requires_approval)
        for a in reply.actions
    }
    assert flags == {
        "ticket.update_routing": ("RISK_MEDIUM", True, False),
        "ticket.change_service_level": ("RISK_MEDIUM", True, True),
        "ticket.link": ("RISK_LOW", True, False),
        "ticket.unlink": ("RISK_LOW", True, False),
        "ticket.undo": ("RISK_MEDIUM", False, False),
        "ticket.undo_service_level": ("RISK_MEDIUM", False, True),
    }
    schema = {a.action_id: {f.name: f for f in a.inputs} for a in reply.actions}
    routing = schema["ticket.update_routing"]
    assert list(routing["field"].allowed_values) == ["queue", "priority"]
    assert (routing["value"].min_length, routing["value"].max_length) == (1, 32)
    assert list(schema["ticket.change_service_level"]["level"].allowed_values) == [
        "standard",
        "priority",
        "critical",
    ]
    assert list(schema["ticket.link"]["target_type"].allowed_values) == ["asset", "customer"]
    assert all(fields["reason"].required for fields in schema.values())


async def test_discovery_offers_nothing_on_closed_tickets(served: Served) -> None:
    async def discover(rec: common_pb2.RecordContext) -> list[tuple[str, bool, str]]:
        reply = await served.stub.Discover(
            provider_pb2.DiscoverRequest(record=rec, operator=ALICE), timeout=5
        )
        return [(a.action_id, a.available, a.unavailable_reason) for a in reply.actions]

    assert await discover(ticket("t-100", "open")) == [(a, True, "") for a in ACTIONS]
    assert await discover(ticket("t-103", "closed")) == [
        (a, False, "TICKET_CLOSED") for a in ACTIONS
    ]
    workitem = common_pb2.RecordContext(tenant="acme", type="workitem", id="wi-1", status="failed")
    assert await discover(workitem) == []


# -- routing changes and their undo -----------------------------------------------------


async def test_update_routing_then_undo_restores_the_before_state(served: Served) -> None:
    changed = await served.execute(
        request("ticket.update_routing", field="queue", value="billing", key="u-1")
    )
    assert outcome(changed) == SUCCEEDED
    change_id = changed.external_ref
    assert change_id.startswith("chg-") and len(change_id) == 20
    assert [(c.field, c.before, c.after) for c in changed.changes] == [
        ("queue", "support", "billing")
    ]
    assert change_id in changed.message
    assert served.routing() == ("billing", "normal", "standard")
    (logged,) = served.store.changes("acme", "t-100")
    assert (logged.change_id, logged.kind, logged.field, logged.before, logged.after) == (
        change_id,
        "field",
        "queue",
        "support",
        "billing",
    )
    assert (logged.actor, logged.idempotency_key, logged.request_id) == ("alice", "u-1", "req-u-1")
    assert logged.reason == "customer asked for it" and logged.undone_by is None
    assert len(logged.trace_id) == 32 and int(logged.trace_id, 16) != 0

    undone = await served.execute(request("ticket.undo", change_id=change_id, key="u-2"))
    assert outcome(undone) == SUCCEEDED
    assert [(c.field, c.before, c.after) for c in undone.changes] == [
        ("queue", "billing", "support")
    ]
    assert undone.external_ref.startswith("chg-") and undone.external_ref != change_id
    assert served.routing() == ("support", "normal", "standard")
    original, undo = served.store.changes("acme", "t-100")
    assert original.undone_by == undo.change_id == undone.external_ref
    assert (undo.undo_of, undo.action_id, undo.before, undo.after) == (
        change_id,
        "ticket.undo",
        "billing",
        "support",
    )


async def test_only_declared_fields_can_be_changed(served: Served) -> None:
    for field in ("status", "service_level", "subject"):
        violations = await served.invalid(
            request("ticket.update_routing", field=field, value="closed")
        )
        assert violations == {"inputs.field": "must be one of: queue, priority"}
    too_long = await served.invalid(request("ticket.update_routing", field="queue", value="q" * 33))
    assert set(too_long) == {"inputs.value"}
    assert served.routing() == ("support", "normal", "standard")
    assert served.store.changes("acme", "t-100") == []


async def test_values_are_validated_per_field(served: Served) -> None:
    for field, value in (("queue", "marketing"), ("priority", "billing"), ("queue", "urgent")):
        reply = await served.execute(request("ticket.update_routing", field=field, value=value))
        assert outcome(reply) == rejected("INVALID_VALUE"), (field, value)
        assert reply.message and list(reply.changes) == []
    same = await served.execute(request("ticket.update_routing", field="queue", value="support"))
    assert outcome(same) == rejected("NO_CHANGE")
    assert served.routing() == ("support", "normal", "standard")
    assert served.store.changes("acme", "t-100") == []

    urgent = await served.execute(
        request("ticket.update_routing", field="priority", value="urgent")
    )
    assert outcome(urgent) == SUCCEEDED
    assert served.routing() == ("support", "urgent", "standard")


async def test_an_undo_happens_once_and_cannot_itself_be_undone(served: Served) -> None:
    changed = await served.execute(request("ticket.update_routing", field="priority", value="high"))
    first = await served.execute(request("ticket.undo", change_id=changed.external_ref))
    assert outcome(first) == SUCCEEDED
    again = await served.execute(request("ticket.undo", change_id=changed.external_ref))
    assert outcome(again) == rejected("ALREADY_UNDONE")
    redo = await served.execute(request("ticket.undo", change_id=first.external_ref))
    assert outcome(redo) == rejected("UNDO_NOT_REVERSIBLE")
    assert served.routing() == ("support", "normal", "standard")
    assert len(served.store.changes("acme", "t-100")) == 2


async def test_an_undo_never_overwrites_a_later_change(served: Served) -> None:
    to_billing = await served.execute(
        request("ticket.update_routing", field="queue", value="billing")
    )
    to_technical = await served.execute(
        request("ticket.update_routing", field="queue", value="technical")
    )
    conflict = await served.execute(request("ticket.undo", change_id=to_billing.external_ref))
    assert outcome(conflict) == rejected("CHANGED_SINCE")
    assert served.routing()[0] == "technical"
    original = served.store.change("acme", to_billing.external_ref)
    assert original is not None and original.undone_by is None

    # Unwinding in reverse order works: each undo finds its own "after" in place.
    for change in (to_technical, to_billing):
        reply = await served.execute(request("ticket.undo", change_id=change.external_ref))
        assert outcome(reply) == SUCCEEDED
    assert served.routing()[0] == "support"


async def test_a_change_of_another_ticket_or_tenant_is_unknown(served: Served) -> None:
    changed = await served.execute(request("ticket.update_routing", field="queue", value="billing"))
    elsewhere = await served.execute(
        request("ticket.undo", "t-101", change_id=changed.external_ref)
    )
    assert outcome(elsewhere) == rejected("UNKNOWN_CHANGE")
    globex = await served.execute(
        request("ticket.undo", "t-200", change_id=changed.external_ref, operator=GINA)
    )
    assert outcome(globex) == rejected("UNKNOWN_CHANGE")
    made_up = await served.execute(request("ticket.undo", change_id="chg-" + "0" * 16))
    assert outcome(made_up) == rejected("UNKNOWN_CHANGE")
    assert served.routing()[0] == "billing"

    malformed = await served.invalid(request("ticket.undo", change_id="chg-XYZ; drop table x"))
    assert set(malformed) == {"inputs.change_id"}


async def test_a_repeated_idempotency_key_acts_once(served: Served) -> None:
    first = await served.execute(
        request("ticket.update_routing", field="queue", value="escalations", key="same")
    )
    second = await served.execute(
        request("ticket.update_routing", field="queue", value="escalations", key="same")
    )
    assert first == second and outcome(first) == SUCCEEDED
    assert len(served.store.changes("acme", "t-100")) == 1

    undo_a = await served.execute(request("ticket.undo", change_id=first.external_ref, key="un"))
    undo_b = await served.execute(request("ticket.undo", change_id=first.external_ref, key="un"))
    assert undo_a == undo_b and outcome(undo_a) == SUCCEEDED
    assert len(served.store.changes("acme", "t-100")) == 2
    assert served.routing()[0] == "support"


async def test_concurrent_changes_serialise_on_the_ticket(served: Served) -> None:
    replies = await asyncio.gather(
        *(
            served.execute(request("ticket.update_routing", field="queue", value="billing"))
            for _ in range(8)
        )
    )
    assert sorted(outcome(r) for r in replies) == [rejected("NO_CHANGE")] * 7 + [SUCCEEDED]
    (winner,) = [r for r in replies if r.outcome == common_pb2.OUTCOME_SUCCEEDED]

    undos = await asyncio.gather(
        *(served.execute(request("ticket.undo", change_id=winner.external_ref)) for _ in range(8))
    )
    assert sorted(outcome(r) for r in undos) == [rejected("ALREADY_UNDONE")] * 7 + [SUCCEEDED]
    assert served.routing()[0] == "support"
    assert len(served.store.changes("acme", "t-100")) == 2


# -- links -------------------------------------------------------------------------


async def test_link_unlink_and_undo_them(served: Served) -> None:
    link = await served.execute(request("ticket.link", target_type="asset", target_id="a-100"))
    assert outcome(link) == SUCCEEDED
    assert [(c.field, c.before, c.after) for c in link.changes] == [("link", "", "asset/a-100")]
    assert served.store.links("acme", "t-100") == [("asset", "a-100")]
    twice = await served.execute(request("ticket.link", target_type="asset", target_id="a-100"))
    assert outcome(twice) == rejected("ALREADY_LINKED")

    unlink = await served.execute(
        request("ticket.unlink", "t-101", target_type="customer", target_id="c-100")
    )
    assert outcome(unlink) == SUCCEEDED
    assert [(c.field, c.before, c.after) for c in unlink.changes] == [
        ("link", "customer/c-100", "")
    ]
    assert served.store.links("acme", "t-101") == []
    not_linked = await served.execute(
        request("ticket.unlink", "t-101", target_type="customer", target_id="c-100")
    )
    assert outcome(not_linked) == rejected("NOT_LINKED")

    relink = await served.execute(request("ticket.undo", "t-101", change_id=unlink.external_ref))
    assert outcome(relink) == SUCCEEDED
    assert served.store.links("acme", "t-101") == [("customer", "c-100")]

    # Unlinked by hand since: undoing the link would remove what is no longer there.
    await served.execute(request("ticket.unlink", target_type="asset", target_id="a-100"))
    stale = await served.execute(request("ticket.undo", change_id=link.external_ref))
    assert outcome(stale) == rejected("CHANGED_SINCE")
    assert served.store.links("acme", "t-100") == []


async def test_links_go_only_to_the_tenants_known_targets(served: Served) -> None:
    for target_type, target_id in (("asset", "a-999"), ("asset", "a-200"), ("customer", "a-100")):
        reply = await served.execute(
            request("ticket.link", target_type=target_type, target_id=target_id)
        )
        assert outcome(reply) == rejected("UNKNOWN_TARGET"), (target_type, target_id)
    bad = await served.invalid(request("ticket.link", target_type="asset", target_id="../a-100"))
    assert set(bad) == {"inputs"}
    other = await served.invalid(request("ticket.link", target_type="invoice", target_id="i-1"))
    assert set(other) == {"inputs.target_type"}
    assert served.store.links("acme", "t-100") == []


# -- service level, closed and unknown tickets ------------------------------------------


async def test_service_level_changes_are_undone_only_by_the_gated_undo(served: Served) -> None:
    changed = await served.execute(request("ticket.change_service_level", level="critical"))
    assert outcome(changed) == SUCCEEDED
    assert [(c.field, c.before, c.after) for c in changed.changes] == [
        ("service_level", "standard", "critical")
    ]
    assert served.routing() == ("support", "normal", "critical")

    ungated = await served.execute(request("ticket.undo", change_id=changed.external_ref))
    assert outcome(ungated) == rejected("UNKNOWN_CHANGE")
    routing = await served.execute(request("ticket.update_routing", field="queue", value="billing"))
    wrong_kind = await served.execute(
        request("ticket.undo_service_level", change_id=routing.external_ref)
    )
    assert outcome(wrong_kind) == rejected("UNKNOWN_CHANGE")

    gated = await served.execute(
        request("ticket.undo_service_level", change_id=changed.external_ref)
    )
    assert outcome(gated) == SUCCEEDED
    assert served.routing() == ("billing", "normal", "standard")


async def test_closed_and_unknown_tickets_are_never_changed(served: Served) -> None:
    # The caller's view ("open") is stale: the provider re-checks its own state.
    for req in (
        request("ticket.update_routing", "t-103", field="queue", value="billing"),
        request("ticket.change_service_level", "t-103", level="critical"),
        request("ticket.link", "t-103", target_type="asset", target_id="a-100"),
    ):
        reply = await served.execute(req)
        assert outcome(reply) == rejected("TICKET_CLOSED")
    assert served.routing("t-103") == ("support", "normal", "standard")
    assert served.store.links("acme", "t-103") == []
    assert served.store.changes("acme", "t-103") == []

    missing = await served.execute(
        request("ticket.update_routing", "t-999", field="queue", value="billing")
    )
    assert outcome(missing) == rejected("UNKNOWN_TICKET")
    # globex's t-200 does not exist for acme, whatever the caller claims.
    foreign = await served.execute(
        request("ticket.update_routing", "t-200", field="queue", value="billing")
    )
    assert outcome(foreign) == rejected("UNKNOWN_TICKET")
    assert served.routing("t-200", "globex") == ("technical", "normal", "standard")


async def test_seeding_again_keeps_existing_state(tmp_path: Path) -> None:
    store = RecordStore.open(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        assert store.seed_demo() == 7
        seeded = store.get("acme", "t-100")
        assert seeded is not None
        store.put(replace(seeded, queue="billing"))
        store.seed(
            [], links=[("acme", "t-100", "asset", "a-100"), ("acme", "t-101", "asset", "a-101")]
        )
        assert store.seed_demo() == 0
        kept = store.get("acme", "t-100")
        assert kept is not None and kept.queue == "billing"
        # Links are only seeded with a new ticket, so an operator's unlink is never undone.
        assert store.links("acme", "t-100") == []
        assert store.links("acme", "t-101") == [("customer", "c-100")]
    finally:
        store.close()


# -- previews ------------------------------------------------------------------------------


def preview_request(
    action: str, ticket_id: str = "t-100", *, operator: common_pb2.Operator = ALICE, **inputs: str
) -> provider_pb2.PreviewRequest:
    execute = request(action, ticket_id, operator=operator, **inputs)
    return provider_pb2.PreviewRequest(
        action_id=execute.action_id,
        record=execute.record,
        operator=execute.operator,
        inputs=execute.inputs,
    )


def changes_of(
    reply: provider_pb2.PreviewResponse | provider_pb2.ExecuteResponse,
) -> list[tuple[str, str, str]]:
    return [(c.field, c.before, c.after) for c in reply.changes]


async def preview_refusal(served: Served, req: provider_pb2.PreviewRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Preview(req, timeout=5)
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION, details
    return details.reason


async def test_describe_marks_the_previewable_actions(served: Served) -> None:
    reply = await served.stub.Describe(provider_pb2.DescribeRequest(), timeout=5)
    assert {a.action_id for a in reply.actions if a.previewable} == {
        "ticket.update_routing",
        "ticket.change_service_level",
        "ticket.link",
        "ticket.unlink",
    }


async def test_a_service_level_preview_shows_the_change_and_changes_nothing(
    served: Served,
) -> None:
    before = served.store.get("acme", "t-100")
    assert before is not None
    req = preview_request("ticket.change_service_level", level="critical")
    preview = await served.stub.Preview(req, timeout=5)
    assert changes_of(preview) == [("service_level", "standard", "critical")]
    assert preview.effect == "changes the service level of ticket t-100 from standard to critical"
    assert preview.state_digest == f"v{before.version}"
    assert any("critical" in w for w in preview.warnings)
    # Read-only: the ticket and its change log are as they were; the same again.
    assert served.store.get("acme", "t-100") == before
    assert served.store.changes("acme", "t-100") == []
    assert await served.stub.Preview(req, timeout=5) == preview

    # Executed on that preview: the change is exactly the one previewed.
    approved = request("ticket.change_service_level", level="critical", key="sl-1")
    approved.preview_digest = preview.state_digest
    done = await served.execute(approved)
    assert outcome(done) == SUCCEEDED
    assert changes_of(done) == changes_of(preview)
    # A second execution approved on the same (now stale) preview is refused; nothing ran.
    again = request("ticket.change_service_level", level="critical", key="sl-2")
    again.preview_digest = preview.state_digest
    assert outcome(await served.execute(again)) == rejected("STATE_CHANGED_SINCE_PREVIEW")
    assert len(served.store.changes("acme", "t-100")) == 1

    lower = await served.stub.Preview(
        preview_request("ticket.change_service_level", level="standard"), timeout=5
    )
    assert changes_of(lower) == [("service_level", "critical", "standard")]
    assert lower.state_digest == f"v{before.version + 1}"
    assert any("lowers" in w for w in lower.warnings)


async def test_a_routing_preview_matches_the_execution(served: Served) -> None:
    preview = await served.stub.Preview(
        preview_request("ticket.update_routing", field="priority", value="urgent"), timeout=5
    )
    assert changes_of(preview) == [("priority", "normal", "urgent")]
    assert preview.effect == "changes the priority of ticket t-100 from normal to urgent"
    assert preview.warnings
    done = await served.execute(request("ticket.update_routing", field="priority", value="urgent"))
    assert changes_of(done) == changes_of(preview)

    link = await served.stub.Preview(
        preview_request("ticket.link", target_type="asset", target_id="a-100"), timeout=5
    )
    assert link.effect == "links ticket t-100 to asset a-100"
    linked = await served.execute(request("ticket.link", target_type="asset", target_id="a-100"))
    assert changes_of(linked) == changes_of(link)
    unlink = await served.stub.Preview(
        preview_request("ticket.unlink", target_type="asset", target_id="a-100"), timeout=5
    )
    unlinked = await served.execute(
        request("ticket.unlink", target_type="asset", target_id="a-100")
    )
    assert changes_of(unlinked) == changes_of(unlink)


async def test_a_preview_refuses_as_execute_would(served: Served) -> None:
    cases = {
        "NO_CHANGE": preview_request("ticket.change_service_level", level="standard"),
        "TICKET_CLOSED": preview_request("ticket.change_service_level", "t-103", level="critical"),
        "INVALID_VALUE": preview_request("ticket.update_routing", field="queue", value="nowhere"),
        "UNKNOWN_TICKET": preview_request(
            "ticket.update_routing", "t-200", field="queue", value="billing"
        ),
        "UNKNOWN_TARGET": preview_request("ticket.link", target_type="asset", target_id="a-200"),
        "NOT_LINKED": preview_request("ticket.unlink", target_type="asset", target_id="a-100"),
    }
    for reason, req in cases.items():
        assert await preview_refusal(served, req) == reason
        execute = request(
            req.action_id,
            req.record.id,
            **{name: value.string_value for name, value in req.inputs.items() if name != "reason"},
        )
        assert outcome(await served.execute(execute)) == rejected(reason)
    # Actions without a preview: UNIMPLEMENTED.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Preview(preview_request("ticket.undo", change_id="chg-" + "0" * 16))
    assert error_details(caught.value).reason == "PREVIEW_NOT_SUPPORTED"


async def test_the_write_requires_the_previewed_version(served: Served) -> None:
    """The race the SDK's check cannot close: the ticket changes between the check and
    the write. The store's conditional update requires the approved version."""
    who = Who("ticket.change_service_level", "req-1", "key-1", "alice", "", "needed")
    ticket_now = served.store.get("acme", "t-100")
    assert ticket_now is not None
    served.store.set_field("acme", "t-100", "queue", "billing", replace(who, action_id="x"))
    refused = served.store.set_field(
        "acme", "t-100", "service_level", "critical", who, expected_version=ticket_now.version
    )
    assert refused == Refused("STATE_CHANGED_SINCE_PREVIEW")
    assert served.routing() == ("billing", "normal", "standard")
    applied = served.store.set_field(
        "acme", "t-100", "service_level", "critical", who, expected_version=ticket_now.version + 1
    )
    assert not isinstance(applied, Refused)
    # A digest the provider never gave names no version: refused, nothing changed.
    stale = request("ticket.change_service_level", level="priority")
    stale.preview_digest = "not-a-version"
    assert outcome(await served.execute(stale)) == rejected("STATE_CHANGED_SINCE_PREVIEW")
    assert served.routing() == ("billing", "normal", "critical")


# -- through the real gateway -----------------------------------------------------------


@pytest.fixture(scope="module")
def records_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """Registry, audit log, gateway and the records provider as real processes."""
    settings = MeshSettings(
        data_dir=tmp_path_factory.mktemp("records-mesh"),
        **{**TEST_MESH, "provider_modules": ("actionmesh.providers.records",)},  # type: ignore[arg-type]
    )
    mesh = Mesh(settings)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


async def test_gateway_discovers_executes_and_undoes_a_routing_change(
    records_mesh: Mesh,
) -> None:
    token = mint_token(
        records_mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"]
    )
    async with grpc.aio.insecure_channel(records_mesh.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

        async def discovered() -> dict[str, gateway_pb2.DiscoveredActionView] | None:
            reply = await gateway.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=ticket("t-100")),
                metadata=bearer(token),
            )
            views = {a.descriptor.action_id: a for a in reply.actions}
            return views if set(views) == set(ACTIONS) else None

        # The provider registers asynchronously after the mesh reports it started.
        views = cast(dict[str, gateway_pb2.DiscoveredActionView], await eventually(discovered))
        assert all(v.available and v.provider_id == "records" for v in views.values())

        async def execute(action: str, **inputs: str) -> gateway_pb2.Execution:
            reply = await gateway.ExecuteAction(
                gateway_pb2.ExecuteActionRequest(
                    action_id=action,
                    record=ticket("t-100"),
                    inputs={"reason": as_input("customer asked for it")}
                    | {name: as_input(value) for name, value in inputs.items()},
                    idempotency_key=uuid.uuid4().hex,
                ),
                metadata=bearer(token),
            )
            return reply.execution

        changed = await execute("ticket.update_routing", field="queue", value="escalations")
        assert changed.outcome == common_pb2.OUTCOME_SUCCEEDED
        assert changed.external_ref.startswith("chg-")
        state, log = ticket_state(records_mesh, "acme", "t-100")
        assert state.queue == "escalations"
        assert [c.change_id for c in log] == [changed.external_ref]
        # One trace spans gateway -> provider: the provider logged the gateway's trace id.
        assert log[0].trace_id == changed.trace_id

        undone = await execute("ticket.undo", change_id=changed.external_ref)
        assert undone.outcome == common_pb2.OUTCOME_SUCCEEDED
        assert [(c.field, c.before, c.after) for c in undone.changes] == [
            ("queue", "escalations", "support")
        ]
        state, log = ticket_state(records_mesh, "acme", "t-100")
        assert state.queue == "support"
        assert log[0].undone_by == undone.external_ref == log[1].change_id

        # Approval-gated: the gateway holds it; the provider's state is untouched.
        held = await execute("ticket.change_service_level", level="critical")
        assert held.outcome == common_pb2.OUTCOME_PENDING_APPROVAL
        assert ticket_state(records_mesh, "acme", "t-100")[0].service_level == "standard"

        async def finished_events() -> list[audit_pb2.AuditEvent] | None:
            reply = await gateway.GetRecordHistory(
                gateway_pb2.GetRecordHistoryRequest(
                    record=common_pb2.RecordRef(type="ticket", id="t-100")
                ),
                metadata=bearer(token),
            )
            done = [
                e
                for e in reply.events
                if e.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
                and e.execution_id in (changed.execution_id, undone.execution_id)
            ]
            return done if len(done) == 2 else None

        events = cast(list[audit_pb2.AuditEvent], await eventually(finished_events, timeout_s=15))
        by_id = {e.execution_id: e for e in events}
        change_event, undo_event = by_id[changed.execution_id], by_id[undone.execution_id]
        assert (change_event.action_id, change_event.external_ref, change_event.actor) == (
            "ticket.update_routing",
            changed.external_ref,
            "alice",
        )
        assert [(c.field, c.before, c.after) for c in change_event.changes] == [
            ("queue", "support", "escalations")
        ]
        assert (undo_event.action_id, undo_event.inputs["change_id"]) == (
            "ticket.undo",
            changed.external_ref,
        )
        assert undo_event.outcome == common_pb2.OUTCOME_SUCCEEDED

        closed = await gateway.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=ticket("t-103", "closed")),
            metadata=bearer(token),
        )
        assert {(a.available, a.unavailable_reason) for a in closed.actions} == {
            (False, "TICKET_CLOSED")
        }
