"""Each service's background loops survive an exception: an error is injected into
the loop (the store raising, a bug in applying a message) and the loop recovers
under its supervisor without a process restart, losing nothing; a loop that keeps
failing turns the service NOT_SERVING until it recovers. A database that cannot be
reached is UNAVAILABLE DATABASE_UNAVAILABLE with RetryInfo for callers, not INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.exc import OperationalError

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.auditlog.storage import AuditRepository
from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.outbox import OutboxShipper
from actionmesh.gateway.storage import GatewayStore, record_attempt_op
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.registry import server as registry_server
from actionmesh.registry.config import RegistryConfig
from actionmesh.registry.directory import Directory
from actionmesh.registry.server import start_registry
from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.rpc.supervisor import LoopPolicy, Supervisor
from actionmesh.runtime.db import database_unavailable, make_engine, sqlite_url
from actionmesh.sdk import (
    ActionContext,
    NoInputs,
    Provider,
    ProviderConfig,
    Result,
    start_provider,
)
from actionmesh.sdk.registration import RegistryLink
from actionmesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import eventually
from tests.test_outbox import event

pytestmark = pytest.mark.timeout(90)

FAST = LoopPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, unhealthy_after=3, settle_s=0.3)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def database_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def failing(times: int, real: Callable[..., Any], error: Callable[[], Exception]) -> Any:
    """``real``, raising ``error()`` on its first ``times`` calls."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return real(*args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper


async def health(running: RunningServer) -> int:
    async with grpc.aio.insecure_channel(running.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


@pytest.fixture
async def health_server() -> AsyncIterator[RunningServer]:
    running = await start_server([])
    try:
        yield running
    finally:
        await running.stop(0.5)


# -- gateway: the audit outbox ---------------------------------------------------------
async def test_the_outbox_shipper_survives_its_store_failing_and_loses_no_event(
    tmp_path: Path, health_server: RunningServer
) -> None:
    """The defect of issue 16: an exception from the store ended the shipper for good."""
    audit_db = tmp_path / "audit.db"
    audit = await start_auditlog(AuditLogConfig(port=0, database_url=sqlite_url(audit_db)))
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    channel = open_channel(audit.address)
    supervisor = Supervisor("gateway", FAST)
    await supervisor.attach(health_server)
    writer = GroupCommitWriter(store)
    writer.start(supervisor)
    shipper = OutboxShipper(store, writer, channel, batch_size=10, retry_max_s=0.3)
    # The database "restarts": every read of the outbox fails for a while.
    outage = asyncio.Event()
    real = store.pending_events

    def pending(limit: int) -> list[tuple[int, bytes]]:
        if not outage.is_set():
            raise database_down()
        return real(limit)

    store.pending_events = pending  # type: ignore[method-assign]
    try:
        shipper.start(supervisor)
        store.record_attempt([event() for _ in range(35)])
        shipper.notify()
        await eventually(lambda: supervisor.loops["audit-outbox"].failures >= FAST.unhealthy_after)
        assert await health(health_server) == NOT_SERVING
        outage.set()  # the database is back
        await eventually(lambda: store.outbox_depth() == 0, timeout_s=15)
        repository = AuditRepository(make_engine(sqlite_url(audit_db)))
        try:
            assert repository.count_all() == 35
        finally:
            repository.close()
        await eventually(lambda: supervisor.healthy)
        assert await health(health_server) == SERVING
    finally:
        await shipper.close(drain_timeout_s=0.1)
        await writer.close()
        await channel.close()
        store.close()
        await audit.stop(1)


# -- gateway: the store writer ---------------------------------------------------------
async def test_the_store_writer_is_restarted_and_later_writes_go_through(tmp_path: Path) -> None:
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    supervisor = Supervisor("gateway", FAST)
    writer = GroupCommitWriter(store)
    store.write_group = failing(  # type: ignore[method-assign]
        1, store.write_group, lambda: RuntimeError("thread pool broken")
    )
    writer.start(supervisor)
    try:
        with pytest.raises(RuntimeError, match="thread pool broken"):
            await writer.write(record_attempt_op([event()]))
        await writer.write(record_attempt_op([event()]))
        assert store.outbox_depth() == 1
        assert supervisor.loops["gateway-store-writer"].failures == 1
    finally:
        await writer.close()
        store.close()


# -- gateway: the provider directory ---------------------------------------------------
async def test_the_provider_watch_recovers_from_a_failure_applying_a_message(
    tmp_path: Path,
) -> None:
    registry = await start_registry(
        RegistryConfig(port=0, database_url=sqlite_url(tmp_path / "registry.db"))
    )
    directory = ProviderDirectory(registry.address)
    supervisor = Supervisor("gateway", FAST)
    directory._apply = failing(  # type: ignore[method-assign]
        1, directory._apply, lambda: ValueError("unexpected message")
    )
    try:
        directory.start(supervisor)
        assert await directory.wait_synced(10.0)
        assert supervisor.loops["provider-watch"].failures == 1
    finally:
        await directory.close()
        await registry.stop(0.5)


# -- registry: health checks and lease expiry ------------------------------------------
async def test_registry_passes_that_keep_failing_turn_it_not_serving_until_they_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_server, "Supervisor", lambda name: Supervisor(name, FAST))
    broken = True
    original = Directory.expire_leases

    async def expire_leases(self: Directory) -> list[Any]:
        if broken:
            raise database_down()
        return await original(self)

    monkeypatch.setattr(Directory, "expire_leases", expire_leases)
    registry = await start_registry(
        RegistryConfig(port=0, database_url=sqlite_url(tmp_path / "registry.db"), lease_ttl_s=1.0)
    )
    try:
        assert registry.supervisor is not None
        await eventually(lambda: _is(registry, NOT_SERVING))
        assert registry.supervisor.status()["lease-expiry"]["state"] == "failing"
        broken = False
        await eventually(lambda: _is(registry, SERVING))
    finally:
        await registry.stop(0.5)


async def _is(running: RunningServer, status: int) -> bool:
    return await health(running) == status


# -- SDK: lease renewal ------------------------------------------------------------------
async def test_a_providers_registry_link_starts_over_after_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = await start_registry(
        RegistryConfig(port=0, database_url=sqlite_url(tmp_path / "registry.db"))
    )
    monkeypatch.setattr(
        RegistryLink,
        "_register",
        _fail_first(RegistryLink._register, lambda: RuntimeError("bug in registering")),
    )
    provider = Provider("recovering", version="1.0.0")

    @provider.action("recovering.noop", label="No-op", record_types=["thing"])
    async def noop(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    running = await start_provider(
        provider,
        ProviderConfig(port=0, registry=registry.address, data_dir=str(tmp_path)),
    )
    try:
        link = provider.registration
        assert link is not None
        await asyncio.wait_for(link.registered.wait(), 15)
        assert running.supervisor is not None
        assert running.supervisor.loops["registry-link-recovering"].failures == 1
    finally:
        await running.stop(1.0)
        await registry.stop(0.5)


def _fail_first(real: Callable[..., Any], error: Callable[[], Exception]) -> Any:
    calls = {"n": 0}

    async def wrapper(self: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error()
        return await real(self)

    return wrapper


# -- a database that cannot be reached --------------------------------------------------
async def test_a_database_outage_is_unavailable_with_a_reason_and_retry_info() -> None:
    class Down(gateway_pb2_grpc.ActionGatewayServiceServicer):
        async def GetExecution(
            self, request: gateway_pb2.GetExecutionRequest, context: grpc.aio.ServicerContext
        ) -> gateway_pb2.GetExecutionResponse:
            raise database_down()

    name = gateway_pb2.DESCRIPTOR.services_by_name["ActionGatewayService"].full_name
    running = await start_server(
        [(gateway_pb2_grpc.add_ActionGatewayServiceServicer_to_server, Down(), name)],
        error_translators=[database_unavailable],
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetExecution(gateway_pb2.GetExecutionRequest(execution_id="x"))
        details = error_details(raised.value)
        assert details.code == grpc.StatusCode.UNAVAILABLE
        assert details.reason == "DATABASE_UNAVAILABLE"
        assert details.retry_after_s == pytest.approx(1.0)
        assert "SELECT" not in details.message  # no driver text reaches the caller
    finally:
        await running.stop(0.5)
    # What is not a database outage stays what it was.
    assert database_unavailable(ValueError("bug")) is None
