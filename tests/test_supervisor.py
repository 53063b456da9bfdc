"""Supervised background loops (actionmesh.rpc.supervisor): a failing loop is logged,
counted and restarted with backoff; one that keeps failing turns the server's
grpc.health.v1 status NOT_SERVING until it makes progress again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.rpc.supervisor import LoopPolicy, LoopState, SupervisedLoop, Supervisor
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)

FAST = LoopPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, unhealthy_after=3, settle_s=0.2)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await start_server([])
    try:
        yield running
    finally:
        await running.stop(0.5)


async def health_of(running: RunningServer) -> int:
    async with grpc.aio.insecure_channel(running.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


async def test_a_failing_loop_is_restarted_and_its_failures_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor("test", FAST)
    runs: list[int] = []
    done = asyncio.Event()

    async def flaky(loop: SupervisedLoop) -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise RuntimeError(f"store down ({len(runs)})")
        loop.progress()
        done.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger="actionmesh.rpc.supervisor"):
        loop = supervisor.spawn("flaky", flaky)
        await asyncio.wait_for(done.wait(), 5)
    assert len(runs) == 3
    assert (loop.failures, loop.failures_in_a_row, loop.state) == (2, 0, LoopState.RUNNING)
    assert "store down (2)" in loop.last_error
    assert sum("background loop flaky failed" in r.getMessage() for r in caplog.records) == 2
    assert supervisor.healthy
    await supervisor.stop()
    assert loop.state is LoopState.STOPPED


async def test_a_loop_that_keeps_failing_turns_health_not_serving_until_it_recovers(
    server: RunningServer,
) -> None:
    supervisor = Supervisor("test", FAST)
    await supervisor.attach(server)
    broken = True

    async def dependency(loop: SupervisedLoop) -> None:
        while True:
            if broken:
                raise ConnectionError("connection refused")
            loop.progress()
            await asyncio.sleep(0.01)

    supervisor.spawn("outbox", dependency)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health_of(server) == serving
    await eventually(lambda: _is(server, not_serving))
    assert supervisor.status()["outbox"]["state"] == "failing"
    broken = False
    await eventually(lambda: _is(server, serving))
    assert supervisor.loops["outbox"].failures >= FAST.unhealthy_after
    await supervisor.stop()


async def _is(server: RunningServer, status: int) -> bool:
    return await health_of(server) == status


async def test_a_periodic_job_that_fails_is_retried_after_the_backoff_not_the_interval() -> None:
    supervisor = Supervisor("test", FAST)
    calls: list[float] = []
    clock = asyncio.get_running_loop()

    async def sweep() -> None:
        calls.append(clock.time())
        if len(calls) == 2:
            raise RuntimeError("database is locked")

    loop = supervisor.every("sweep", 0.3, sweep, first_after_s=0.0)
    await eventually(lambda: len(calls) >= 3, timeout_s=5)
    # The failed second run is retried after the backoff (<= 0.05 s), not 0.3 s later.
    assert calls[2] - calls[1] < 0.2
    assert loop.failures == 1 and loop.failures_in_a_row == 0
    await supervisor.stop()


async def test_a_loop_that_returns_is_done_and_a_stopped_loop_never_restarts() -> None:
    supervisor = Supervisor("test", FAST)
    runs: list[int] = []

    async def once(loop: SupervisedLoop) -> None:
        runs.append(1)

    loop = supervisor.spawn("once", once)
    await eventually(lambda: loop.state is LoopState.STOPPED)
    await asyncio.sleep(0.1)
    assert runs == [1]

    async def forever(loop: SupervisedLoop) -> None:
        runs.append(2)
        raise RuntimeError("always")

    failing = supervisor.spawn("forever", forever)
    await eventually(lambda: failing.failures >= 2)
    await failing.stop()
    count = len(runs)
    await asyncio.sleep(0.2)
    assert len(runs) == count
    with pytest.raises(ValueError, match="already running"):
        supervisor.spawn("never-twice", forever)
        supervisor.spawn("never-twice", forever)
    await supervisor.stop()
