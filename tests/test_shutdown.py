"""Graceful shutdown: SIGTERM marks health NOT_SERVING first, drains, deregisters, exits 0.

Each service is a real process of the test's own mesh (run_service is the code under
test). A grpc.health.v1 Watch stream opened before the signal records what the
process announced, and when; the process's exit is timed against it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.mesh import Mesh
from actionmesh.v1 import (
    common_pb2,
    gateway_pb2_grpc,
    provider_pb2,
    provider_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import eventually, vouching_channel
from tests.fault_provider import read_journal
from tests.test_faults import (
    BYSTANDER,
    DEADLINE_S,
    VICTIM,
    Call,
    Planned,
    execute,
    journal_path,
    operator_token,
    record,
    start_fault_mesh,
    start_fault_provider,
    stop_fault_mesh,
)

pytestmark = pytest.mark.timeout(90)

# Longer than any handler here, so a drain never cuts one short.
SLOW_TIMEOUT_S = 10.0
SLOW_MS = 1500
# The registry lease in these meshes is 30 s: removal within this is deregistration.
DEREGISTERED_WITHIN_S = 5.0


@pytest.fixture
def own_mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = start_fault_mesh(tmp_path / "mesh")
    try:
        yield mesh
    finally:
        stop_fault_mesh(mesh)


class HealthProbe:
    """grpc.health.v1 Check of one process every few milliseconds, from before the signal.

    Records when the process stopped answering SERVING: NOT_SERVING, or a refused
    call once its server stopped accepting.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll())
        await eventually(lambda: self.first("SERVING") is not None, timeout_s=5)

    async def _poll(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                self.seen.append((time.monotonic(), status))
                await asyncio.sleep(0.01)

    def first(self, status: str) -> float | None:
        return next((at for at, seen in self.seen if seen == status), None)

    def stopped_serving(self) -> float | None:
        """When it first answered anything but SERVING, after having been SERVING."""
        if self.first("SERVING") is None:
            return None
        return next((at for at, seen in self.seen if seen != "SERVING"), None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class HealthWatch:
    """Health.Watch of one process, each status with the monotonic time it arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())
        await eventually(lambda: self.seen, timeout_s=5)

    async def _watch(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            try:
                async for reply in stream:
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    self.seen.append((time.monotonic(), name))
            except grpc.aio.AioRpcError as exc:
                self.seen.append((time.monotonic(), exc.code().name))

    def first(self, status: str) -> float | None:
        return next((at for at, seen in self.seen if seen == status), None)


async def exit_of(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> tuple[int, float]:
    """The process's exit code and the monotonic time it was seen gone."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        assert time.monotonic() < deadline, "the process did not exit"
        await asyncio.sleep(0.02)
    assert process.returncode is not None
    return process.returncode, time.monotonic()


def process_of(mesh: Mesh, name: str) -> subprocess.Popen[bytes]:
    process = mesh.services[name].process
    assert process is not None
    return process


async def handler_started(mesh: Mesh, provider: str, keys: set[str]) -> None:
    def started() -> bool:
        return keys <= {e["key"] for e in read_journal(journal_path(mesh, provider))}

    await eventually(started, timeout_s=10)


async def test_gateway_sigterm_drains_in_flight_and_refuses_new_calls(own_mesh: Mesh) -> None:
    start_fault_provider(own_mesh, "slow", timeout_s=SLOW_TIMEOUT_S)
    address = own_mesh.address("gateway")
    token = operator_token(own_mesh)
    probe = HealthProbe(address)
    await probe.start()
    async with vouching_channel(own_mesh, address) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
        slow = [Planned(uuid.uuid4().hex, "slow", sleep_ms=SLOW_MS) for _ in range(3)]
        in_flight = [asyncio.create_task(execute(gateway, token, item)) for item in slow]
        await handler_started(own_mesh, "slow", {item.key for item in slow})

        process_of(own_mesh, "gateway").send_signal(signal.SIGTERM)
        await eventually(probe.stopped_serving, timeout_s=5)
        # No longer SERVING: from now on a new call is refused and nothing runs.
        late = Planned(uuid.uuid4().hex, BYSTANDER)
        refused = await execute(gateway, token, late)
        refused_at = time.monotonic()
        done: list[Call] = await asyncio.gather(*in_flight)
    code, exited_at = await exit_of(process_of(own_mesh, "gateway"))
    await probe.close()

    assert refused.code == "UNAVAILABLE", refused
    assert late.key not in {e["key"] for e in read_journal(journal_path(own_mesh, BYSTANDER))}
    # The calls already running were drained, not cut: each finished with its outcome.
    assert [c.category for c in done] == ["OK/SUCCEEDED"] * 3, done
    assert all(c.elapsed_s >= SLOW_MS / 1000 for c in done)
    stopped_at = probe.stopped_serving()
    assert stopped_at is not None and stopped_at < refused_at < exited_at
    assert code == 0


async def provider_execute(address: str, item: Planned) -> Call:
    """ExecuteAction straight at a provider, as the gateway dispatches it."""
    request = provider_pb2.ExecuteRequest(
        action_id=f"{item.provider}.touch",
        record=record(item.record_id),
        operator=common_pb2.Operator(subject="alice", tenant="acme", roles=["operator"]),
        inputs={"sleep_ms": common_pb2.InputValue(integer_value=item.sleep_ms)},
        idempotency_key=item.key,
        request_id=uuid.uuid4().hex,
    )
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await provider_pb2_grpc.ActionProviderServiceStub(channel).Execute(
                request, timeout=DEADLINE_S
            )
        except grpc.aio.AioRpcError as exc:
            return Call(item, time.monotonic() - started, exc.code().name)
    outcome = common_pb2.Outcome.Name(reply.outcome).removeprefix("OUTCOME_")
    return Call(item, time.monotonic() - started, "OK", outcome, execution_id=request.request_id)


async def sigterm_provider_with_call_in_flight(
    mesh: Mesh, dispatch: Callable[[Planned], Coroutine[Any, Any, Call]]
) -> tuple[Call, dict[str, float]]:
    """SIGTERM the "slow" provider while ``dispatch`` runs a call on it; when things happened."""
    probe = HealthProbe(mesh.address("slow"))
    await probe.start()
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)

        async def listed() -> set[str]:
            reply = await registry.ListProviders(registry_pb2.ListProvidersRequest(), timeout=2)
            return {p.provider_id for p in reply.providers}

        item = Planned(uuid.uuid4().hex, "slow", sleep_ms=SLOW_MS)
        in_flight = asyncio.create_task(dispatch(item))
        await handler_started(mesh, "slow", {item.key})
        times = {"signalled": time.monotonic()}
        process_of(mesh, "slow").send_signal(signal.SIGTERM)

        async def deregistered() -> bool:
            return "slow" not in await listed()

        await eventually(deregistered, timeout_s=DEREGISTERED_WITHIN_S)
        times["deregistered"] = time.monotonic()
        # Once out of the registry it already says NOT_SERVING (asked now, while its call
        # still runs): the order is checked at the provider, not by comparing when two
        # pollers happened to notice each step (their lags differ under load).
        serving = False
        async with grpc.aio.insecure_channel(mesh.address("slow")) as slow:
            try:
                health = await health_pb2_grpc.HealthStub(slow).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                serving = health.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError as exc:  # already gone: not serving either
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        times["serving_when_deregistered"] = float(serving)
        done = await in_flight
        times["answered"] = time.monotonic()
        assert await listed() == {VICTIM, BYSTANDER}
    code, times["exited"] = await exit_of(process_of(mesh, "slow"))
    await probe.close()
    assert code == 0
    not_serving_at = probe.first("NOT_SERVING")
    assert not_serving_at is not None, probe.seen
    times["not_serving"] = not_serving_at
    return done, times


async def test_provider_sigterm_finishes_its_call_and_deregisters(own_mesh: Mesh) -> None:
    start_fault_provider(own_mesh, "slow", timeout_s=SLOW_TIMEOUT_S)
    address = own_mesh.address("slow")
    done, at = await sigterm_provider_with_call_in_flight(
        own_mesh, lambda item: provider_execute(address, item)
    )

    # NOT_SERVING first, then out of the registry (by deregistration: the lease is 30 s),
    # the running call answered, then the exit.
    assert at["signalled"] < at["not_serving"] < at["exited"]
    assert at["signalled"] < at["deregistered"] < at["exited"]
    assert at["serving_when_deregistered"] == 0.0
    assert at["deregistered"] - at["signalled"] < DEREGISTERED_WITHIN_S
    assert at["answered"] <= at["exited"]
    assert done.category == "OK/SUCCEEDED", done


async def test_provider_sigterm_does_not_strand_the_gateways_execution(own_mesh: Mesh) -> None:
    start_fault_provider(own_mesh, "slow", timeout_s=SLOW_TIMEOUT_S)
    token = operator_token(own_mesh)
    async with vouching_channel(own_mesh) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
        done, _ = await sigterm_provider_with_call_in_flight(
            own_mesh, lambda item: execute(gateway, token, item)
        )
    assert done.category == "OK/SUCCEEDED", done


async def test_registry_and_auditlog_sigterm_stop_serving_then_exit_0(own_mesh: Mesh) -> None:
    for service in ("registry", "auditlog"):
        probe = HealthProbe(own_mesh.address(service))
        await probe.start()
        process_of(own_mesh, service).send_signal(signal.SIGTERM)
        code, exited_at = await exit_of(process_of(own_mesh, service))
        await probe.close()

        stopped_at = probe.stopped_serving()
        assert stopped_at is not None and stopped_at < exited_at, (service, probe.seen)
        assert code == 0, service


async def test_sigterm_announces_not_serving_to_health_watchers(own_mesh: Mesh) -> None:
    names = ["gateway", "registry", "auditlog", VICTIM]
    watches = {name: HealthWatch(own_mesh.address(name)) for name in names}
    for watch in watches.values():
        await watch.start()
    assert all(w.first("SERVING") is not None for w in watches.values()), {
        name: w.seen for name, w in watches.items()
    }
    for name in names:
        process_of(own_mesh, name).send_signal(signal.SIGTERM)
    exits = {name: await exit_of(process_of(own_mesh, name)) for name in names}

    for name, (code, exited_at) in exits.items():
        not_serving_at = watches[name].first("NOT_SERVING")
        assert not_serving_at is not None and not_serving_at < exited_at, name
        assert code == 0, name
