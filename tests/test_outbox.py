"""The gateway's audit outbox: nothing lost while the audit log is down, no poison pill."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.auditlog.storage import AuditRepository
from actionmesh.gateway.outbox import OutboxShipper
from actionmesh.gateway.storage import GatewayStore
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.rpc.channels import open_channel
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.v1 import audit_pb2, common_pb2
from tests.conftest import eventually


def event(tenant: str = "acme") -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        event_id=uuid.uuid4().hex,
        type=audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
        tenant=tenant,
        record=common_pb2.RecordRef(type="workitem", id="wi-1"),
        actor="alice",
        action_id="workitem.retry",
        outcome=common_pb2.OUTCOME_DENIED,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stored(audit_db: Path) -> int:
    repository = AuditRepository(make_engine(sqlite_url(audit_db)))
    try:
        return repository.count_all()
    finally:
        repository.close()


async def test_events_written_while_audit_is_down_arrive_once_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    channel = open_channel(f"127.0.0.1:{port}")
    writer = GroupCommitWriter(store)
    writer.start()
    shipper = OutboxShipper(store, writer, channel, batch_size=7, retry_max_s=0.3)
    shipper.start()
    try:
        store.record_attempt([event() for _ in range(25)])
        shipper.notify()
        assert store.outbox_depth() == 25  # nothing can be delivered yet
        audit_db = tmp_path / "audit.db"
        audit = await start_auditlog(AuditLogConfig(port=port, database_url=sqlite_url(audit_db)))
        try:
            await eventually(lambda: store.outbox_depth() == 0, timeout_s=15)
            assert stored(audit_db) == 25
        finally:
            await audit.stop(1)
    finally:
        await shipper.close(drain_timeout_s=0.1)
        await writer.close()
        await channel.close()
        store.close()


async def test_an_event_the_audit_log_refuses_is_parked_not_blocking(tmp_path: Path) -> None:
    audit_db = tmp_path / "audit.db"
    audit = await start_auditlog(AuditLogConfig(port=0, database_url=sqlite_url(audit_db)))
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    channel = open_channel(audit.address)
    writer = GroupCommitWriter(store)
    writer.start()
    shipper = OutboxShipper(store, writer, channel, batch_size=50, retry_max_s=0.3)
    shipper.start()
    try:
        store.record_attempt([event(), event(tenant=""), event()])
        shipper.notify()
        await eventually(lambda: store.outbox_depth() == 0, timeout_s=10)
        assert store.parked_count() == 1
        assert stored(audit_db) == 2
    finally:
        await shipper.close(drain_timeout_s=0.1)
        await writer.close()
        await channel.close()
        store.close()
        await audit.stop(1)
