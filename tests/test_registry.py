"""RegistryService against real servers: the registry and fake providers on loopback.

A fake provider is a plain grpc.aio server exposing only grpc.health.v1, which is
all the registry talks to. Timings are sub-second; every wait polls against a
bounded deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from actionmesh.registry.config import RegistryConfig
from actionmesh.registry.directory import Directory
from actionmesh.registry.health import GrpcHealthProber
from actionmesh.registry.model import Change, ChangeType, Health, Provider
from actionmesh.registry.server import start_registry
from actionmesh.registry.servicer import SERVICE_NAME, RegistryServicer
from actionmesh.registry.storage import ProviderRepository
from actionmesh.registry.validation import endpoint_problem
from actionmesh.registry.watch import ChangeHub
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import FieldViolation, ResourceExhausted, error_details
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(30)

WAIT_S = 5.0
SERVING = registry_pb2.PROVIDER_HEALTH_SERVING
NOT_SERVING = registry_pb2.PROVIDER_HEALTH_NOT_SERVING
UNKNOWN = registry_pb2.PROVIDER_HEALTH_UNKNOWN
UPSERTED = registry_pb2.PROVIDER_CHANGE_TYPE_UPSERTED
REMOVED = registry_pb2.PROVIDER_CHANGE_TYPE_REMOVED


# --- real fake providers -------------------------------------------------------------


class FakeProvider:
    """A provider process reduced to its grpc.health.v1 endpoint."""

    def __init__(self) -> None:
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = grpc.aio.server()
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port, "could not bind the fake provider"
        await self._server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


@pytest.fixture
async def fake_provider() -> AsyncIterator[Callable[[], Awaitable[FakeProvider]]]:
    started: list[FakeProvider] = []

    async def start() -> FakeProvider:
        provider = FakeProvider()
        await provider.start()
        started.append(provider)
        return provider

    yield start
    for provider in started:
        await provider.stop()


# --- registries ----------------------------------------------------------------------


class Registries:
    """Starts registries on free ports against one SQLite file and cleans them up."""

    def __init__(self, db_path: Path) -> None:
        self.database_url = sqlite_url(db_path)
        self._running: list[RunningServer] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, **overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {
            "port": 0,
            "database_url": self.database_url,
            "lease_ttl_s": 30.0,
            "health_check_interval_s": 0.1,
            "health_check_timeout_s": 0.5,
            **overrides,
        }
        running = await start_registry(RegistryConfig(**settings))
        self._running.append(running)
        return running

    def stub(self, running: RunningServer) -> registry_pb2_grpc.RegistryServiceAsyncStub:
        channel = grpc.aio.insecure_channel(running.address)
        self._channels.append(channel)
        return async_stub(channel)

    async def stop(self, running: RunningServer) -> None:
        self._running.remove(running)
        await running.stop(1.0)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        for running in list(self._running):
            await self.stop(running)


@pytest.fixture
async def registries(tmp_path: Path) -> AsyncIterator[Registries]:
    handle = Registries(tmp_path / "state" / "registry.db")
    yield handle
    await handle.close()


# --- helpers -------------------------------------------------------------------------


def async_stub(channel: grpc.aio.Channel) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    # The stub's overloads cannot tell an aio channel from a sync one when grpc is untyped.
    return cast(
        "registry_pb2_grpc.RegistryServiceAsyncStub", registry_pb2_grpc.RegistryServiceStub(channel)
    )


def action(
    action_id: str = "workitem.retry", *, inputs: Sequence[common_pb2.InputField] = ()
) -> common_pb2.ActionDescriptor:
    return common_pb2.ActionDescriptor(
        action_id=action_id,
        label=f"Run {action_id}",
        record_types=["workitem"],
        inputs=inputs,
        risk=common_pb2.RISK_LOW,
    )


def registration(
    provider_id: str,
    endpoint: str,
    actions: Sequence[common_pb2.ActionDescriptor] | None = None,
    version: str = "1.0.0",
) -> registry_pb2.RegisterProviderRequest:
    return registry_pb2.RegisterProviderRequest(
        provider_id=provider_id,
        endpoint=endpoint,
        version=version,
        actions=[action()] if actions is None else actions,
    )


async def list_providers(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub,
) -> dict[str, registry_pb2.ProviderRegistration]:
    reply = await stub.ListProviders(registry_pb2.ListProvidersRequest(), timeout=WAIT_S)
    return {p.provider_id: p for p in reply.providers}


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


async def wait_health(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub,
    provider_id: str,
    wanted: registry_pb2.ProviderHealth.ValueType,
) -> None:
    async def check() -> bool:
        provider = (await list_providers(stub)).get(provider_id)
        return provider is not None and provider.health == wanted

    await eventually(check, f"{provider_id} has health {registry_pb2.ProviderHealth.Name(wanted)}")


class Watch:
    """A WatchProviders stream read with bounded waits."""

    def __init__(self, stub: registry_pb2_grpc.RegistryServiceAsyncStub) -> None:
        self.call = stub.WatchProviders(registry_pb2.WatchProvidersRequest())

    async def next(self) -> registry_pb2.WatchProvidersResponse:
        message = await asyncio.wait_for(self.call.read(), WAIT_S)
        assert message is not grpc.aio.EOF, "watch stream ended"
        assert isinstance(message, registry_pb2.WatchProvidersResponse)
        return message

    async def snapshot(self) -> dict[str, registry_pb2.ProviderRegistration]:
        message = await self.next()
        assert message.WhichOneof("event") == "snapshot"
        return {p.provider_id: p for p in message.snapshot.providers}

    async def change(self) -> registry_pb2.ProviderChange:
        message = await self.next()
        assert message.WhichOneof("event") == "change"
        return message.change

    async def change_where(
        self, predicate: Callable[[registry_pb2.ProviderChange], bool]
    ) -> registry_pb2.ProviderChange:
        """Skip changes until one matches (health flaps are not under test here)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            change = await self.change()
            if predicate(change):
                return change
        pytest.fail("no matching change before the deadline")


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert details.code == code
    assert details.reason == reason
    return details


# --- registration, listing, watching ---------------------------------------------------


async def test_register_then_list(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start(lease_ttl_s=12.5)
    stub = registries.stub(running)
    provider = await fake_provider()
    descriptor = action(
        "workitem.retry",
        inputs=[
            common_pb2.InputField(name="reason", type=common_pb2.INPUT_TYPE_STRING, required=True)
        ],
    )

    reply = await stub.RegisterProvider(
        registration("workitems", provider.endpoint, [descriptor], version="2.3.4")
    )

    assert len(reply.lease_id) == 32
    assert reply.lease_ttl.ToTimedelta() == timedelta(seconds=12.5)
    listed = await list_providers(stub)
    assert list(listed) == ["workitems"]
    stored = listed["workitems"]
    assert stored.endpoint == provider.endpoint
    assert stored.version == "2.3.4"
    assert list(stored.actions) == [descriptor]
    assert stored.health in (UNKNOWN, SERVING)
    lease = stored.lease_expires_at.ToDatetime() - stored.registered_at.ToDatetime()
    assert lease == timedelta(seconds=12.5)
    await wait_health(stub, "workitems", SERVING)


async def test_watch_snapshot_then_registration_then_health(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start(health_check_interval_s=60.0)
    stub = registries.stub(running)
    first, second = await fake_provider(), await fake_provider()
    await stub.RegisterProvider(registration("first", first.endpoint, [action("a.one")]))
    await wait_health(stub, "first", SERVING)

    watch = Watch(stub)
    snapshot = await watch.snapshot()
    assert list(snapshot) == ["first"]
    assert snapshot["first"].health == SERVING

    await stub.RegisterProvider(registration("second", second.endpoint, [action("b.two")]))
    registered = await watch.change()
    assert registered.type == UPSERTED
    assert registered.provider.provider_id == "second"
    assert registered.provider.health == UNKNOWN
    assert [a.action_id for a in registered.provider.actions] == ["b.two"]
    # Checked right away, not after the next interval: the interval here is long.
    checked = await watch.change()
    assert checked.type == UPSERTED
    assert checked.provider.provider_id == "second"
    assert checked.provider.health == SERVING
    watch.call.cancel()


async def test_health_check_runs_immediately_on_register(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    # With a one-minute interval only the check triggered by registering can
    # make the provider SERVING within the wait.
    running = await registries.start(health_check_interval_s=60.0)
    stub = registries.stub(running)
    provider = await fake_provider()
    await stub.RegisterProvider(registration("prompt", provider.endpoint))
    await wait_health(stub, "prompt", SERVING)


async def test_health_follows_the_provider_health_service(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    provider = await fake_provider()
    await stub.RegisterProvider(registration("flaky", provider.endpoint))
    await wait_health(stub, "flaky", SERVING)
    watch = Watch(stub)
    await watch.snapshot()

    await provider.set_serving(False)
    change = await watch.change()
    assert (change.type, change.provider.health) == (UPSERTED, NOT_SERVING)
    assert (await list_providers(stub))["flaky"].health == NOT_SERVING

    await provider.set_serving(True)
    change = await watch.change()
    assert (change.type, change.provider.health) == (UPSERTED, SERVING)
    watch.call.cancel()


async def test_stopped_provider_turns_not_serving_and_recovers(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    provider = await fake_provider()
    await stub.RegisterProvider(registration("crashy", provider.endpoint))
    await wait_health(stub, "crashy", SERVING)

    await provider.stop()
    await wait_health(stub, "crashy", NOT_SERVING)

    # Same port again: the registry's channel must reconnect promptly.
    await provider.start()
    await wait_health(stub, "crashy", SERVING)


async def test_unchanged_health_publishes_nothing(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start(health_check_interval_s=0.05)
    stub = registries.stub(running)
    provider = await fake_provider()
    await stub.RegisterProvider(registration("steady", provider.endpoint))
    await wait_health(stub, "steady", SERVING)
    watch = Watch(stub)
    await watch.snapshot()

    # Many health passes run meanwhile; the next event must be our re-registration.
    await asyncio.sleep(0.5)
    lease = (await stub.RegisterProvider(registration("steady", provider.endpoint))).lease_id
    change = await watch.change()
    assert (change.type, change.provider.health) == (UPSERTED, UNKNOWN)
    change = await watch.change()
    assert (change.type, change.provider.health) == (UPSERTED, SERVING)
    await stub.DeregisterProvider(
        registry_pb2.DeregisterProviderRequest(provider_id="steady", lease_id=lease)
    )
    assert (await watch.change()).type == REMOVED
    watch.call.cancel()


# --- leases --------------------------------------------------------------------------


async def test_lease_expiry_removes_provider_and_watchers_see_it(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start(lease_ttl_s=0.4)
    stub = registries.stub(running)
    provider = await fake_provider()
    watch = Watch(stub)
    assert await watch.snapshot() == {}
    started = time.monotonic()
    await stub.RegisterProvider(registration("mortal", provider.endpoint))

    removed = await watch.change_where(lambda c: c.type == REMOVED)

    assert time.monotonic() - started >= 0.4
    assert removed.provider.provider_id == "mortal"
    assert await list_providers(stub) == {}
    watch.call.cancel()


async def test_renewing_keeps_provider_past_its_ttl(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    ttl = 0.25
    running = await registries.start(lease_ttl_s=ttl)
    stub = registries.stub(running)
    provider = await fake_provider()
    lease = (await stub.RegisterProvider(registration("durable", provider.endpoint))).lease_id
    first_expiry = (await list_providers(stub))["durable"].lease_expires_at.ToDatetime()

    started = time.monotonic()
    last = None
    while time.monotonic() - started < 3 * ttl:
        reply = await stub.RenewLease(
            registry_pb2.RenewLeaseRequest(provider_id="durable", lease_id=lease)
        )
        last = reply.lease_expires_at.ToDatetime()
        await asyncio.sleep(ttl / 4)

    assert "durable" in await list_providers(stub)
    assert last is not None and last > first_expiry + timedelta(seconds=2 * ttl)
    assert (await list_providers(stub))["durable"].lease_expires_at.ToDatetime() == last


async def test_renew_after_expiry_is_lease_not_found(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start(lease_ttl_s=0.3)
    stub = registries.stub(running)
    provider = await fake_provider()
    lease = (await stub.RegisterProvider(registration("lapsed", provider.endpoint))).lease_id

    async def gone() -> bool:
        return "lapsed" not in await list_providers(stub)

    await eventually(gone, "the lease lapses")
    await expect_error(
        stub.RenewLease(registry_pb2.RenewLeaseRequest(provider_id="lapsed", lease_id=lease)),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    # The documented recovery: register again.
    await stub.RegisterProvider(registration("lapsed", provider.endpoint))
    assert "lapsed" in await list_providers(stub)


async def test_renew_with_unknown_provider_or_wrong_lease_is_lease_not_found(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    provider = await fake_provider()
    lease = (await stub.RegisterProvider(registration("known", provider.endpoint))).lease_id

    for provider_id, lease_id in [("unknown", lease), ("known", "0" * 32), ("known", "")]:
        await expect_error(
            stub.RenewLease(
                registry_pb2.RenewLeaseRequest(provider_id=provider_id, lease_id=lease_id)
            ),
            grpc.StatusCode.NOT_FOUND,
            "LEASE_NOT_FOUND",
        )


async def test_reregistering_replaces_the_registration_and_its_lease(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    old, new = await fake_provider(), await fake_provider()
    old_lease = (
        await stub.RegisterProvider(registration("mover", old.endpoint, [action("m.old")]))
    ).lease_id
    await wait_health(stub, "mover", SERVING)

    new_lease = (
        await stub.RegisterProvider(
            registration("mover", new.endpoint, [action("m.new")], version="2")
        )
    ).lease_id

    assert new_lease != old_lease
    stored = (await list_providers(stub))["mover"]
    assert (stored.endpoint, stored.version) == (new.endpoint, "2")
    assert [a.action_id for a in stored.actions] == ["m.new"]
    await expect_error(
        stub.RenewLease(registry_pb2.RenewLeaseRequest(provider_id="mover", lease_id=old_lease)),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    # Health now follows the new endpoint, not the old one.
    await old.stop()
    await wait_health(stub, "mover", SERVING)
    await new.set_serving(False)
    await wait_health(stub, "mover", NOT_SERVING)


async def test_deregister_requires_the_lease(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    provider = await fake_provider()
    lease = (await stub.RegisterProvider(registration("leaving", provider.endpoint))).lease_id
    watch = Watch(stub)
    assert set(await watch.snapshot()) == {"leaving"}

    await expect_error(
        stub.DeregisterProvider(
            registry_pb2.DeregisterProviderRequest(provider_id="leaving", lease_id="f" * 32)
        ),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    assert "leaving" in await list_providers(stub)

    await stub.DeregisterProvider(
        registry_pb2.DeregisterProviderRequest(provider_id="leaving", lease_id=lease)
    )
    removed = await watch.change_where(lambda c: c.type == REMOVED)
    assert removed.provider.provider_id == "leaving"
    assert await list_providers(stub) == {}
    await expect_error(
        stub.DeregisterProvider(
            registry_pb2.DeregisterProviderRequest(provider_id="leaving", lease_id=lease)
        ),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    watch.call.cancel()


# --- validation and conflicts --------------------------------------------------------


async def test_invalid_registration_lists_every_field_violation(
    registries: Registries,
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    request = registry_pb2.RegisterProviderRequest(
        provider_id="Bad Id",
        endpoint="no-port",
        actions=[
            common_pb2.ActionDescriptor(action_id="retry", label=" "),
            action(
                "workitem.retry",
                inputs=[
                    common_pb2.InputField(name="Reason", type=common_pb2.INPUT_TYPE_STRING),
                    common_pb2.InputField(name="count"),
                    common_pb2.InputField(name="mode", type=common_pb2.INPUT_TYPE_ENUM),
                    common_pb2.InputField(
                        name="mode", type=common_pb2.INPUT_TYPE_ENUM, allowed_values=["a"]
                    ),
                ],
            ),
            action("workitem.retry"),
            common_pb2.ActionDescriptor(
                action_id="workitem.edit", label="Edit", record_types=["Work Item"]
            ),
        ],
    )

    details = await expect_error(
        stub.RegisterProvider(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REGISTRATION"
    )

    assert [v.field for v in details.violations] == [
        "provider_id",
        "endpoint",
        "actions[0].action_id",
        "actions[0].label",
        "actions[0].record_types",
        "actions[1].inputs[0].name",
        "actions[1].inputs[1].type",
        "actions[1].inputs[2].allowed_values",
        "actions[1].inputs[3].name",
        "actions[2].action_id",
        "actions[3].record_types[0]",
    ]
    assert all(isinstance(v, FieldViolation) and v.description for v in details.violations)
    duplicate = details.violations[9]
    assert "actions[1].action_id" in duplicate.description
    assert await list_providers(stub) == {}


async def test_registration_needs_an_action(registries: Registries) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    details = await expect_error(
        stub.RegisterProvider(registration("empty", "127.0.0.1:1", actions=[])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REGISTRATION",
    )
    assert [v.field for v in details.violations] == ["actions"]


@pytest.mark.parametrize(
    ("endpoint", "valid"),
    [
        ("127.0.0.1:50061", True),
        ("localhost:1", True),
        ("provider-a.mesh.svc:65535", True),
        ("[::1]:50061", True),
        ("", False),
        ("localhost", False),
        (":50061", False),
        ("localhost:0", False),
        ("localhost:65536", False),
        ("localhost:http", False),
        ("::1:50061", False),
        ("dns:///localhost:50061", False),
        ("bad host:1", False),
    ],
)
def test_endpoint_must_be_host_and_port(endpoint: str, valid: bool) -> None:
    assert (endpoint_problem(endpoint) is None) is valid


async def test_action_id_held_by_another_provider_conflicts(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    owner, rival = await fake_provider(), await fake_provider()
    owner_lease = (
        await stub.RegisterProvider(
            registration("owner", owner.endpoint, [action("shared.act"), action("owner.only")])
        )
    ).lease_id

    details = await expect_error(
        stub.RegisterProvider(
            registration("rival", rival.endpoint, [action("rival.only"), action("shared.act")])
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACTION_ID_CONFLICT",
    )
    assert details.metadata == {"action_id": "shared.act", "provider_id": "owner"}
    assert set(await list_providers(stub)) == {"owner"}

    # The owner itself may re-register with the same actions.
    owner_lease = (
        await stub.RegisterProvider(
            registration("owner", owner.endpoint, [action("shared.act"), action("owner.only")])
        )
    ).lease_id
    # Once the owner is gone the action id is free.
    await stub.DeregisterProvider(
        registry_pb2.DeregisterProviderRequest(provider_id="owner", lease_id=owner_lease)
    )
    await stub.RegisterProvider(registration("rival", rival.endpoint, [action("shared.act")]))
    assert set(await list_providers(stub)) == {"rival"}


async def test_a_record_type_has_one_system_of_record(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    running = await registries.start()
    stub = registries.stub(running)
    owner, rival = await fake_provider(), await fake_provider()
    first = registration("owner", owner.endpoint, [action("owner.act")])
    first.record_sources.append("workitem")
    owner_lease = (await stub.RegisterProvider(first)).lease_id
    second = registration("rival", rival.endpoint, [action("rival.act")])
    second.record_sources.append("workitem")
    details = await expect_error(
        stub.RegisterProvider(second), grpc.StatusCode.ALREADY_EXISTS, "RECORD_SOURCE_CONFLICT"
    )
    assert details.metadata["provider_id"] == "owner"
    listed = (await stub.ListProviders(registry_pb2.ListProvidersRequest())).providers
    assert [(p.provider_id, list(p.record_sources)) for p in listed] == [("owner", ["workitem"])]
    # Malformed declarations are refused like any other field.
    bad = registration("rival", rival.endpoint, [action("rival.act")])
    bad.record_sources.append("Not A Type")
    await expect_error(
        stub.RegisterProvider(bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REGISTRATION"
    )
    # Once the owner is gone, the type may have another source.
    await stub.DeregisterProvider(
        registry_pb2.DeregisterProviderRequest(provider_id="owner", lease_id=owner_lease)
    )
    await stub.RegisterProvider(second)


# --- restart and shutdown ------------------------------------------------------------


async def test_registrations_survive_a_restart(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    first = await registries.start()
    stub = registries.stub(first)
    provider = await fake_provider()
    descriptor = action("persist.me")
    lease = (
        await stub.RegisterProvider(registration("keeper", provider.endpoint, [descriptor]))
    ).lease_id
    await wait_health(stub, "keeper", SERVING)
    before = (await list_providers(stub))["keeper"]
    await registries.stop(first)

    second = await registries.start()
    assert second.port != 0
    stub = registries.stub(second)
    after = (await list_providers(stub))["keeper"]
    assert after.endpoint == provider.endpoint
    assert list(after.actions) == [descriptor]
    assert after.registered_at == before.registered_at
    assert after.lease_expires_at == before.lease_expires_at
    # The provider keeps its lease across the restart.
    await stub.RenewLease(registry_pb2.RenewLeaseRequest(provider_id="keeper", lease_id=lease))
    await provider.set_serving(False)
    await wait_health(stub, "keeper", NOT_SERVING)


async def test_leases_keep_lapsing_across_a_restart(
    registries: Registries, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    first = await registries.start(lease_ttl_s=0.5)
    stub = registries.stub(first)
    provider = await fake_provider()
    await stub.RegisterProvider(registration("orphan", provider.endpoint))
    await registries.stop(first)

    second = await registries.start(lease_ttl_s=0.5)
    stub = registries.stub(second)

    async def gone() -> bool:
        return "orphan" not in await list_providers(stub)

    await eventually(gone, "the lease that was never renewed lapses")


async def test_stopping_the_registry_ends_watch_streams_cleanly(
    registries: Registries,
) -> None:
    running = await registries.start()
    watch = Watch(registries.stub(running))
    assert await watch.snapshot() == {}
    started = time.monotonic()

    await registries.stop(running)

    assert await asyncio.wait_for(watch.call.read(), WAIT_S) is grpc.aio.EOF
    assert await watch.call.code() == grpc.StatusCode.OK
    # Well under the 1 s grace: the stream was ended, not cut off by the drain.
    assert time.monotonic() - started < 0.9


# --- watchers: disconnects and slow consumers ----------------------------------------


@contextlib.asynccontextmanager
async def serve_directory(
    tmp_path: Path, *, watch_queue_size: int = 1024, lease_ttl_s: float = 30.0
) -> AsyncIterator[tuple[Directory, registry_pb2_grpc.RegistryServiceAsyncStub]]:
    """The parts start_registry wires, minus the background loops, kept in hand.

    Without the expiry loop a lapsed lease stays in the table until something
    else notices, which is the window these tests need.
    """
    engine = make_engine(sqlite_url(tmp_path / "bare.db"))
    prober = GrpcHealthProber(timeout_s=0.5, max_reconnect_backoff_s=0.1)
    directory = Directory(
        ProviderRepository(engine),
        prober,
        lease_ttl=timedelta(seconds=lease_ttl_s),
        watch_queue_size=watch_queue_size,
    )
    await directory.open()
    running = await start_server(
        [
            (
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                RegistryServicer(directory),
                SERVICE_NAME,
            )
        ]
    )
    running.on_stop.append(directory.close)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield directory, async_stub(channel)
    finally:
        await running.stop(0.5)
        engine.dispose()


async def test_watcher_is_unsubscribed_when_the_client_goes_away(tmp_path: Path) -> None:
    async with serve_directory(tmp_path) as (directory, stub):
        watches = [Watch(stub), Watch(stub)]
        for watch in watches:
            await watch.snapshot()
        assert directory.watcher_count == 2

        watches[0].call.cancel()

        async def one_left() -> bool:
            return directory.watcher_count == 1

        await eventually(one_left, "the cancelled watcher is unsubscribed")
        watches[1].call.cancel()

        async def none_left() -> bool:
            return directory.watcher_count == 0

        await eventually(none_left, "the second watcher is unsubscribed")


async def test_a_watcher_that_falls_behind_gets_resource_exhausted(tmp_path: Path) -> None:
    async with serve_directory(tmp_path, watch_queue_size=2) as (directory, stub):
        watch = Watch(stub)
        await watch.snapshot()
        # A burst larger than the queue, published before the stream can drain any
        # of it: exactly what a watcher that stopped reading would face.
        for index in range(3):
            directory._hub.publish(Change(ChangeType.UPSERTED, _provider(f"p{index}")))

        # Changes already taken off the queue may still arrive; then the error.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            for _ in range(3):
                await watch.change()
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "WATCHER_TOO_SLOW"
        assert directory.watcher_count == 0

        # Watching again starts over with a fresh snapshot.
        again = Watch(stub)
        assert await again.snapshot() == {}
        again.call.cancel()


def _provider(provider_id: str) -> Provider:
    moment = utcnow()
    return Provider(
        provider_id=provider_id,
        endpoint="127.0.0.1:1",
        version="1",
        actions=(action(),),
        lease_id="0" * 32,
        lease_expires_at=moment,
        registered_at=moment,
        health=Health.UNKNOWN,
    )


async def test_a_watcher_that_falls_behind_is_dropped_with_an_error() -> None:
    hub = ChangeHub(queue_size=3)
    slow, fast = hub.subscribe(), hub.subscribe()
    received: list[Change] = []

    for index in range(4):
        hub.publish(Change(ChangeType.UPSERTED, _provider(f"p{index}")))
        received.append(await anext(fast))

    assert [c.provider.provider_id for c in received] == ["p0", "p1", "p2", "p3"]
    assert hub.subscriber_count == 1
    with pytest.raises(ResourceExhausted) as caught:
        await anext(slow)
    assert caught.value.reason == "WATCHER_TOO_SLOW"


async def test_closing_the_hub_ends_waiting_watchers() -> None:
    hub = ChangeHub(queue_size=2)
    subscription = hub.subscribe()
    waiter = asyncio.create_task(anext(subscription))
    await asyncio.sleep(0)
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, WAIT_S)
    assert hub.subscriber_count == 0


async def test_a_lapsed_lease_cannot_be_renewed_before_it_is_swept(
    tmp_path: Path, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    provider = await fake_provider()
    async with serve_directory(tmp_path, lease_ttl_s=0.2) as (_directory, stub):
        lease = (await stub.RegisterProvider(registration("late", provider.endpoint))).lease_id
        await asyncio.sleep(0.25)
        assert "late" in await list_providers(stub)  # not swept: no expiry loop here
        await expect_error(
            stub.RenewLease(registry_pb2.RenewLeaseRequest(provider_id="late", lease_id=lease)),
            grpc.StatusCode.NOT_FOUND,
            "LEASE_NOT_FOUND",
        )


async def test_a_lapsed_provider_no_longer_holds_its_action_ids(
    tmp_path: Path, fake_provider: Callable[[], Awaitable[FakeProvider]]
) -> None:
    provider = await fake_provider()
    async with serve_directory(tmp_path, lease_ttl_s=0.2) as (_directory, stub):
        await stub.RegisterProvider(registration("old", provider.endpoint, [action("x.act")]))
        watch = Watch(stub)
        assert set(await watch.snapshot()) == {"old"}
        await asyncio.sleep(0.25)

        await stub.RegisterProvider(registration("new", provider.endpoint, [action("x.act")]))

        assert set(await list_providers(stub)) == {"new"}
        removed = await watch.change_where(lambda c: c.type == REMOVED)
        assert removed.provider.provider_id == "old"
        watch.call.cancel()
