"""Webhook notifications through real processes: a gateway with subscriptions, a receiver.

The receiver (actionmesh.webhook_receiver, in this process) is down while executions
end PARTIAL and approvals are requested and rejected: nothing waits for it, the delivery
log shows the failed attempts, and once it is back it receives every notification,
signed, each id processed once. The documented check refuses a tampered body, a
changed timestamp, an old delivery and a replayed id; a sensitive record's notification
carries no inputs; a bad subscriptions file stops the gateway at start with the reason.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from actionmesh.client.webhooks import (
    DEFAULT_TOLERANCE_S,
    TIMESTAMP_HEADER,
    WebhookReceiver,
    WebhookVerificationError,
    sign_headers,
    verify_webhook,
)
from actionmesh.gateway.notifications import (
    DeliveryAttempt,
    NotificationConfigError,
    NotificationRouter,
    NotificationState,
    NotificationType,
    load_subscriptions,
)
from actionmesh.gateway.storage import (
    GatewayStore,
    claim_notifications_op,
    notification_attempted_op,
    prune_notifications_op,
)
from actionmesh.mesh import Mesh, MeshError, Service
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from actionmesh.webhook_receiver import RunningReceiver, start_receiver
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.governance_fixtures import case
from tests.test_cli import cli

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
DELIVERED = gateway_pb2.NOTIFICATION_DELIVERY_STATE_DELIVERED


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Hooks:
    """A gateway with two subscriptions (acme: everything; globex: approvals) whose
    receiver this test starts and stops on a fixed port."""

    def __init__(self, mesh: Mesh, folder: Path) -> None:
        self.secret = secrets.token_hex(32).encode()
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "acme.secret").write_bytes(self.secret)
        (folder / "globex.secret").write_text(
            "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        )
        self.file = folder / "notifications.json"
        self.file.write_text(
            json.dumps(
                {
                    "subscriptions": [
                        {
                            "id": "acme-all",
                            "tenant": "acme",
                            "url": f"http://127.0.0.1:{self.port}/hooks",
                            "events": ["*"],
                            "secret_file": "acme.secret",
                        },
                        {
                            "id": "globex-approvals",
                            "tenant": "globex",
                            "url": f"http://127.0.0.1:{self.port}/globex",
                            "events": ["approval.requested"],
                            "secret_file": "globex.secret",
                        },
                    ]
                }
            )
        )
        self.receiver: RunningReceiver | None = None
        self.gateway: Service = mesh.start_gateway(
            f"gateway-hooks-{uuid.uuid4().hex[:6]}",
            "--notifications-file",
            str(self.file),
            "--notification-poll-interval-s",
            "0.2",
            "--notification-retry-initial-s",
            "0.2",
            "--notification-retry-max-s",
            "0.5",
            "--notification-timeout-s",
            "2",
        )

    def start_receiver(self) -> RunningReceiver:
        self.receiver = start_receiver(self.secret, port=self.port)
        return self.receiver

    def stop_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None


@pytest.fixture(scope="module")
def hooks(mesh: Mesh, govtest: Path) -> Iterator[Hooks]:
    running = Hooks(mesh, mesh.data_dir / "hooks")
    try:
        yield running
    finally:
        running.stop_receiver()
        mesh.stop_service(running.gateway.name)


@pytest.fixture
async def stub(mesh: Mesh, hooks: Hooks, token: TokenFactory) -> Any:
    async with vouching_channel(mesh, hooks.gateway.address) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

        async def visible() -> bool:
            reply = await gateway.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=case("probe"), skip_cache=True),
                metadata=bearer(token(roles=("supervisor",))),
            )
            return any(a.provider_id == "govtest" for a in reply.actions)

        await eventually(visible, timeout_s=20)
        yield gateway


def execute(action: str, record: common_pb2.RecordContext, note: str = "") -> Any:
    return gateway_pb2.ExecuteActionRequest(
        action_id=f"govtest.{action}",
        record=record,
        inputs={"note": common_pb2.InputValue(string_value=note)} if note else {},
        idempotency_key=uuid.uuid4().hex,
    )


async def deliveries(
    stub: Stub, token: str, **filters: Any
) -> list[gateway_pb2.NotificationDelivery]:
    reply = await stub.ListNotificationDeliveries(
        gateway_pb2.ListNotificationDeliveriesRequest(page_size=500, **filters),
        metadata=bearer(token),
    )
    return list(reply.deliveries)


async def test_a_receiver_that_was_down_gets_every_notification_once_signed(
    stub: Stub, hooks: Hooks, token: TokenFactory
) -> None:
    hooks.stop_receiver()
    alice, sam = token(), token(subject="sam", roles=("supervisor",))
    secret_note = "hunter2-customer-secret"

    # The webhook is down: executions neither wait for it nor fail because of it.
    half = (
        await stub.ExecuteAction(execute("partial", case("n-half")), metadata=bearer(alice))
    ).execution
    assert half.outcome == common_pb2.OUTCOME_PARTIAL
    held = (
        await stub.ExecuteAction(
            execute("guarded", case("n-held"), "switch it on"), metadata=bearer(alice)
        )
    ).execution
    assert held.outcome == common_pb2.OUTCOME_PENDING_APPROVAL
    await stub.RejectExecution(
        gateway_pb2.RejectExecutionRequest(execution_id=held.execution_id, comment="not today"),
        metadata=bearer(sam),
    )
    sensitive = (
        await stub.ExecuteAction(
            execute(
                "guarded",
                case("n-secret", sensitivity=common_pb2.SENSITIVITY_SENSITIVE),
                secret_note,
            ),
            metadata=bearer(sam),
        )
    ).execution
    assert sensitive.outcome == common_pb2.OUTCOME_PENDING_APPROVAL
    expected = {
        (half.execution_id, "dev.actionmesh.execution.partial"),
        (held.execution_id, "dev.actionmesh.approval.requested"),
        (held.execution_id, "dev.actionmesh.approval.rejected"),
        (sensitive.execution_id, "dev.actionmesh.approval.requested"),
    }
    ours = {e for e, _ in expected}

    # The delivery log shows the failures (to a supervisor of the tenant only).
    async def failing() -> list[gateway_pb2.NotificationDelivery]:
        failed = [
            d
            for d in await deliveries(stub, sam, failed_only=True)
            if d.execution_id in ours and d.attempts >= 2
        ]
        return failed if len(failed) == len(expected) else []

    failed = await eventually(failing, timeout_s=20)
    assert isinstance(failed, list)
    for delivery in failed:
        assert delivery.subscription_id == "acme-all"
        assert delivery.state == gateway_pb2.NOTIFICATION_DELIVERY_STATE_PENDING
        assert delivery.last_error and delivery.last_status_code == 0
        assert len(delivery.attempt_log) == delivery.attempts
        assert not any(a.delivered for a in delivery.attempt_log)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await deliveries(stub, alice)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    other_tenant = token(subject="gus", tenant="globex", roles=("supervisor",))
    assert not any(d.execution_id in ours for d in await deliveries(stub, other_tenant))

    # Back up: every notification arrives, verified, each id processed once.
    receiver = hooks.start_receiver()

    def arrived() -> set[tuple[str, str]]:
        got = {
            (e["data"]["execution_id"], e["type"])
            for e in receiver.received.events
            if e["data"]["execution_id"] in ours
        }
        return got if got >= expected else set()

    await eventually(arrived, timeout_s=20)
    mine = [e for e in receiver.received.events if e["data"]["execution_id"] in ours]
    assert len(mine) == len(expected) == len({e["id"] for e in mine})
    assert receiver.received.refused == []
    for event in mine:
        assert event["specversion"] == "1.0"
        assert event["source"] == "/actionmesh/tenants/acme"
        assert event["subject"] == f"executions/{event['data']['execution_id']}"
        assert "inputs" not in event["data"]
    partial = next(e for e in mine if e["type"].endswith("execution.partial"))
    assert partial["data"]["outcome"] == "PARTIAL"
    assert partial["data"]["reason"] == "WRITE_BACK_FAILED"
    rejected = next(e for e in mine if e["type"].endswith("approval.rejected"))
    assert rejected["data"]["approval"] == {"state": "REJECTED", "by": "sam"}
    assert rejected["data"]["message"] == "not today"

    # The sensitive record's notification carries no inputs, not even in the raw bytes.
    secret_bodies = [
        body for _, body in receiver.received.deliveries if sensitive.execution_id.encode() in body
    ]
    assert secret_bodies
    for body in secret_bodies:
        assert secret_note.encode() not in body and b"hmac-sha256" not in body
        assert json.loads(body)["data"]["sensitive"] is True

    async def all_delivered() -> bool:
        log = [d for d in await deliveries(stub, sam) if d.execution_id in ours]
        return len(log) == len(expected) and all(d.state == DELIVERED for d in log)

    await eventually(all_delivered)
    log = [d for d in await deliveries(stub, sam) if d.execution_id in ours]
    for delivery in log:
        assert delivery.attempt_log[-1].delivered and delivery.attempt_log[-1].status_code == 200
        assert delivery.HasField("delivered_at")
    assert not [d for d in await deliveries(stub, sam, failed_only=True) if d.execution_id in ours]


async def test_tampered_old_and_replayed_deliveries_are_detected(
    stub: Stub, hooks: Hooks, token: TokenFactory
) -> None:
    receiver = hooks.receiver or hooks.start_receiver()
    half = (
        await stub.ExecuteAction(execute("partial", case("n-check")), metadata=bearer(token()))
    ).execution

    def captured() -> tuple[dict[str, str], bytes] | None:
        for headers, body in receiver.received.deliveries:
            if half.execution_id.encode() in body:
                return headers, body
        return None

    found = await eventually(captured)
    assert isinstance(found, tuple)
    headers, body = found
    secret = hooks.secret
    stamp = int(headers[TIMESTAMP_HEADER])
    # The genuine delivery checks out at the time it was sent.
    verified = verify_webhook(secret, headers, body, now=stamp)
    assert verified.event["data"]["execution_id"] == half.execution_id

    def reason(hdrs: dict[str, str], raw: bytes, **kw: Any) -> str:
        with pytest.raises(WebhookVerificationError) as refused:
            verify_webhook(secret, hdrs, raw, **kw)
        return refused.value.reason

    tampered = body.replace(b'"PARTIAL"', b'"SUCCEEDED"')
    assert tampered != body
    assert reason(headers, tampered, now=stamp) == "bad_signature"
    # A replay with a fresh timestamp but the old signature fails the signature.
    assert reason({**headers, TIMESTAMP_HEADER: str(stamp + 600)}, body, now=stamp + 600) == (
        "bad_signature"
    )
    # The same delivery replayed later than the window fails the timestamp check.
    late = stamp + DEFAULT_TOLERANCE_S + 1
    assert reason(headers, body, now=late) == "stale_timestamp"
    assert reason({k: v for k, v in headers.items() if k != "webhook-signature"}, body) == (
        "missing_header"
    )
    # Another secret does not verify it.
    with pytest.raises(WebhookVerificationError):
        verify_webhook(b"x" * 32, headers, body, now=stamp)
    # Replayed within the window: the receiver knows the id and does not process it again.
    check = WebhookReceiver(secret)
    assert check.receive(headers, body, now=stamp) is not None
    assert check.receive(headers, body, now=stamp + 1) is None
    # Re-signing the same id (what a gateway retry does) is still the same id: a duplicate.
    again = sign_headers(secret, headers["webhook-id"], body, timestamp=stamp + 2)
    assert check.receive(again, body, now=stamp + 2) is None
    # And the running receiver refuses a tampered POST with 400.
    refused_before = len(receiver.received.refused)
    post = urllib.request.Request(
        receiver.url + "/hooks", data=tampered, headers=headers, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as answer:
        opener.open(post, timeout=5)
    assert answer.value.code == 400
    assert receiver.received.refused[refused_before:] == ["bad_signature"]


def test_a_bad_subscriptions_file_stops_the_gateway_with_the_reason(
    mesh: Mesh, tmp_path: Path
) -> None:
    (tmp_path / "short.secret").write_text("too short")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "subscriptions": [
                    {
                        "id": "x",
                        "tenant": "acme",
                        "url": "http://hooks.example.com/x",
                        "secret_file": "short.secret",
                    }
                ]
            }
        )
    )
    try:
        with pytest.raises(MeshError) as failed:
            mesh.start_gateway("gateway-bad-hooks", "--notifications-file", str(bad))
    finally:
        mesh.services.pop("gateway-bad-hooks", None)
    assert "subscriptions[0].url must be an https URL" in str(failed.value)


# -- without processes: the file, the routing, the leases ---------------------------


def subscription_file(tmp_path: Path, **entry: Any) -> str:
    (tmp_path / "s.secret").write_bytes(b"s" * 32)
    values = {
        "id": "s1",
        "tenant": "acme",
        "url": "https://hooks.example.com/x",
        "secret_file": "s.secret",
        **entry,
    }
    path = tmp_path / "subs.json"
    path.write_text(json.dumps({"subscriptions": [{k: v for k, v in values.items() if v}]}))
    return str(path)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"events": ["approval.maybe"]}, "events: unknown ['approval.maybe']"),
        ({"tenant": "no spaces"}, "subscriptions[0].tenant must match"),
        ({"secret_file": "missing.secret"}, "subscriptions[0].secret_file"),
        ({"colour": "red"}, "unknown fields ['colour']"),
        ({"url": "ftp://hooks.example.com"}, "must be an https URL"),
    ],
)
def test_subscription_file_errors_name_the_entry_and_field(
    tmp_path: Path, entry: dict[str, Any], says: str
) -> None:
    with pytest.raises(NotificationConfigError) as refused:
        load_subscriptions(subscription_file(tmp_path, **entry))
    assert says in str(refused.value)


def audit_event(
    kind: int, outcome: int, *, tenant: str = "acme", sensitive: bool = False
) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        event_id=uuid.uuid4().hex,
        type=kind,  # type: ignore[arg-type]
        tenant=tenant,
        execution_id=uuid.uuid4().hex,
        action_id="govtest.partial",
        record=common_pb2.RecordRef(type="govtest", id="c-1"),
        actor="alice",
        outcome=outcome,  # type: ignore[arg-type]
        message="note was hunter2",
        inputs={"note": "hmac-sha256:abc" if sensitive else "hunter2"},
        inputs_redacted=sensitive,
    )


def test_routing_picks_the_tenants_subscriptions_and_never_inputs(tmp_path: Path) -> None:
    (subscription,) = load_subscriptions(subscription_file(tmp_path, events=["*"]))
    router = NotificationRouter([subscription])
    now = datetime.now(UTC)
    finished = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
    assert router.rows([audit_event(finished, common_pb2.OUTCOME_SUCCEEDED)], now) == []
    assert router.rows([audit_event(finished, common_pb2.OUTCOME_PARTIAL, tenant="x")], now) == []
    plain, secret = router.rows(
        [
            audit_event(finished, common_pb2.OUTCOME_PARTIAL),
            audit_event(finished, common_pb2.OUTCOME_TIMED_OUT, sensitive=True),
        ],
        now,
    )
    assert json.loads(plain["payload"])["type"] == "dev.actionmesh.execution.partial"
    assert json.loads(plain["payload"])["data"]["message"] == "note was hunter2"
    body = json.loads(secret["payload"])
    assert body["type"] == "dev.actionmesh.execution.timed_out"
    assert "message" not in body["data"] and b"hunter2" not in secret["payload"]
    for row in (plain, secret):
        assert b"inputs" not in row["payload"] and b"hmac-sha256" not in row["payload"]


def test_two_replicas_never_lease_the_same_notification(tmp_path: Path) -> None:
    store = GatewayStore(sqlite_url(tmp_path / "gw.db"))
    try:
        store.notifications = NotificationRouter(
            load_subscriptions(subscription_file(tmp_path, events=["*"]))
        )
        partial = [
            audit_event(audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED, common_pb2.OUTCOME_PARTIAL)
            for _ in range(6)
        ]
        store.record_attempt(partial)
        now = datetime.now(UTC)
        due = store.due_notifications(now, 100)
        assert len(due) == 6
        until = now + timedelta(seconds=30)
        first = store.write(claim_notifications_op(due, "a", now, until))
        second = store.write(claim_notifications_op(due, "b", now, until))
        assert sorted(first) == due and second == []
        assert store.due_notifications(now, 100) == []
        # Only the holder records an attempt; a lapsed lease lets another replica take it.
        attempt = DeliveryAttempt(1, now, 200, "", True)
        delivered = NotificationState.DELIVERED
        assert not store.write(notification_attempted_op(due[0], "b", attempt, delivered, now))
        assert store.write(notification_attempted_op(due[0], "a", attempt, delivered, now))
        later = until + timedelta(seconds=1)
        assert sorted(store.write(claim_notifications_op(due, "b", later, later))) == due[1:]
        # Settled ones go after the retention; pending ones stay.
        assert store.write(prune_notifications_op(later + timedelta(days=30))) == 1
        assert store.notification_counts() == {"PENDING": 5}
    finally:
        store.close()


def test_the_subscriptions_file_reloads_and_a_bad_edit_keeps_the_previous(
    tmp_path: Path,
) -> None:
    path = subscription_file(tmp_path, events=["approval.requested"])
    router = NotificationRouter.from_file(path)
    assert router.reload_if_changed() is None
    subscription_file(tmp_path, events=["approval.requested", "execution.partial"])
    assert router.reload_if_changed() is True
    (subscription,) = router.subscriptions
    assert NotificationType.EXECUTION_PARTIAL in subscription.events
    Path(path).write_text("{not json")
    assert router.reload_if_changed() is False
    assert router.subscriptions == (subscription,) and "subs.json" in router.reload_error
    # A rotated secret (subscription_file rewrote it as s*32) is picked up too.
    subscription_file(tmp_path, events=["approval.requested", "execution.partial"])
    (tmp_path / "s.secret").write_bytes(b"t" * 32)
    assert router.reload_if_changed() is True and router.reload_error == ""
    assert router.subscriptions[0].secret == b"t" * 32


async def test_up_subscribes_the_local_receiver_and_the_cli_shows_the_log(mesh: Mesh) -> None:
    """What the README shows: `actionmesh up`'s receiver gets acme's approval request,
    verified, and `actionmesh notifications` lists it for a supervisor only."""

    def mint(subject: str, roles: str) -> str:
        return cli(
            mesh, "token", "--subject", subject, "--tenant", "acme", "--roles", roles
        ).stdout.strip()

    alice, sam = mint("alice", "operator"), mint("sam", "supervisor")
    asked = cli(
        mesh,
        "run",
        "ticket.change_service_level",
        "ticket/t-101",
        "--status",
        "open",
        "--input",
        "level=critical",
        "--input",
        "reason=paging test",
        "--json",
        token=alice,
    )
    execution_id = json.loads(asked.stdout)["execution_id"]

    def received() -> list[dict[str, Any]]:
        path = mesh.receiver_events_path
        if not path.exists():
            return []
        events = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [e for e in events if e["data"]["execution_id"] == execution_id]

    [event] = await eventually(received)  # type: ignore[misc]
    assert event["type"] == "dev.actionmesh.approval.requested"
    assert event["data"]["action_id"] == "ticket.change_service_level"
    assert "notification dev.actionmesh.approval.requested" in (
        mesh.services["webhook-receiver"].log_path.read_text()  # type: ignore[union-attr]
    )

    async def delivered() -> list[dict[str, Any]]:
        shown = cli(mesh, "notifications", "--json", token=sam)
        assert shown.returncode in (0, 3), shown.stdout + shown.stderr
        return [
            d
            for d in json.loads(shown.stdout)["deliveries"]
            if d["execution_id"] == execution_id
            and d["state"] == "NOTIFICATION_DELIVERY_STATE_DELIVERED"
        ]

    [row] = await eventually(delivered)  # type: ignore[misc]
    assert row["subscription_id"] == "local-receiver" and row["event_type"] == (
        "approval.requested"
    )
    table = cli(mesh, "notifications", token=sam)
    assert execution_id in table.stdout and "DELIVERED" in table.stdout
    forbidden = cli(mesh, "notifications", token=alice)
    assert forbidden.returncode != 0 and "NOTIFICATION_LOG_FORBIDDEN" in forbidden.stdout


async def test_two_replicas_on_one_database_send_each_notification_once(
    mesh: Mesh, govtest: Path, postgres_url: str, token: TokenFactory, tmp_path: Path
) -> None:
    """Both replicas deliver from the same outbox; the leases keep them off each
    other's rows, so the receiver sees every id once and no duplicate at all."""
    secret = secrets.token_hex(32).encode()
    (tmp_path / "r.secret").write_bytes(secret)
    receiver = start_receiver(secret)
    (tmp_path / "subs.json").write_text(
        json.dumps(
            {
                "subscriptions": [
                    {
                        "id": "replicas",
                        "tenant": "acme",
                        "url": receiver.url + "/hooks",
                        "events": ["execution.partial"],
                        "secret_file": "r.secret",
                    }
                ]
            }
        )
    )
    flags = (
        "--notifications-file",
        str(tmp_path / "subs.json"),
        "--notification-poll-interval-s",
        "0.05",
    )
    names = [f"gateway-hooks-{side}-{uuid.uuid4().hex[:6]}" for side in "ab"]
    services = [mesh.start_gateway(n, *flags, database_url=postgres_url) for n in names]
    channels = [vouching_channel(mesh, s.address) for s in services]
    try:
        stubs = [Stub(channel) for channel in channels]
        alice = token()

        async def sees(stub: Stub) -> bool:
            reply = await stub.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=case("probe"), skip_cache=True),
                metadata=bearer(token(roles=("supervisor",))),
            )
            return any(a.provider_id == "govtest" for a in reply.actions)

        for stub in stubs:
            await eventually(lambda stub=stub: sees(stub), timeout_s=20)
        done = [
            (
                await stubs[i % 2].ExecuteAction(
                    execute("partial", case(f"n-rep-{i}")), metadata=bearer(alice)
                )
            ).execution
            for i in range(8)
        ]
        assert all(d.outcome == common_pb2.OUTCOME_PARTIAL for d in done)
        wanted = {d.execution_id for d in done}

        def all_in() -> bool:
            got = {e["data"]["execution_id"] for e in receiver.received.events}
            return got >= wanted

        await eventually(all_in, timeout_s=20)
        ids = [e["id"] for e in receiver.received.events]
        assert len(ids) == len(set(ids)) == len(wanted)
        assert receiver.received.duplicates == [] and receiver.received.refused == []
    finally:
        for channel in channels:
            await channel.close()
        for name in names:
            mesh.stop_service(name)
        receiver.stop()
