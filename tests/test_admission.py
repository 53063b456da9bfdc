"""Rate and concurrency limits: one tenant cannot starve the others, no provider is flooded.

The limit logic is checked directly (gateway.admission), then through gateway processes
started with tight limits next to the session mesh, calling the governance provider's
``slow`` action so executions stay in flight while others arrive.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest

from actionmesh.gateway.admission import Admission
from actionmesh.gateway.config import GatewayConfig
from actionmesh.mesh import Mesh
from actionmesh.rpc.errors import ErrorDetails, ResourceExhausted, error_details
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.governance_fixtures import case
from tests.test_governance import provider_calls, request

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
# A config that passes the token checks, so the limit checks are what is tested.
DEV_TOKENS = {"jwt_dev_mode": True, "jwt_secret_file": "dev-key"}


# -- the limits themselves -------------------------------------------------------------
async def test_the_rate_is_per_tenant_and_per_operation() -> None:
    admission = Admission.from_settings("3/second", 0, 0)
    for _ in range(3):
        await admission.check_rate("acme", "execute")
    with pytest.raises(ResourceExhausted) as refused:
        await admission.check_rate("acme", "execute")
    assert refused.value.reason == "TENANT_RATE_LIMITED"
    assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 1.0
    assert refused.value.metadata == {"limit": "3 per 1 second", "operation": "execute"}
    await admission.check_rate("globex", "execute")  # another tenant has its own window
    await admission.check_rate("acme", "discover")  # and discovery its own count


def test_concurrency_places_are_taken_and_given_back_once() -> None:
    admission = Admission.from_settings("", 2, 3)
    first, second = admission.enter("acme", "p"), admission.enter("acme", "p")
    with pytest.raises(ResourceExhausted) as tenant_full:
        admission.enter("acme", "q")
    assert tenant_full.value.reason == "TENANT_CONCURRENCY_LIMITED"
    third = admission.enter("globex", "p")
    with pytest.raises(ResourceExhausted) as provider_full:
        admission.enter("initech", "p")
    assert provider_full.value.reason == "PROVIDER_CONCURRENCY_LIMITED"
    assert provider_full.value.metadata["provider_id"] == "p"
    admission.enter("initech", "q").release()  # other providers are not affected
    first.release()
    first.release()  # a second release must not free a place someone else holds
    assert admission.in_flight(tenant="acme") == 1 and admission.in_flight(provider_id="p") == 2
    admission.enter("initech", "p")
    with pytest.raises(ResourceExhausted):
        admission.enter("acme", "p")
    second.release()
    third.release()
    assert admission.in_flight(tenant="acme") == 0 and admission.in_flight(tenant="globex") == 0


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"tenant_rate_limit": "lots"}, "is not a rate"),
        ({"tenant_max_concurrent_executions": -1}, "0 \\(off\\) or positive"),
    ],
)
def test_bad_limits_are_refused_at_start(settings: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        GatewayConfig(**DEV_TOKENS, **settings)  # type: ignore[arg-type]


def test_the_defaults_limit_something() -> None:
    config = GatewayConfig(**DEV_TOKENS)  # type: ignore[arg-type]
    assert config.tenant_rate_limit and config.tenant_max_concurrent_executions > 0
    assert config.provider_max_concurrent_executions > config.tenant_max_concurrent_executions


# -- through a gateway process -----------------------------------------------------------
async def limited_gateway(mesh: Mesh, token: TokenFactory, *flags: str) -> tuple[str, Stub]:
    name = f"gateway-limits-{uuid.uuid4().hex[:6]}"
    service = mesh.start_gateway(name, *flags)
    # The test backend vouches for the govtest records (a trusted caller of this gateway).
    channel = vouching_channel(mesh, service.address)
    stub = Stub(channel)
    # Warm up with a tenant the tests do not use, so no test tenant's budget is spent.
    probe = token(subject="probe", tenant="warmup", roles=("supervisor",))

    async def sees_govtest() -> bool:
        reply = await stub.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=case("probe", tenant="warmup")),
            metadata=bearer(probe),
        )
        return any(a.provider_id == "govtest" and a.available for a in reply.actions)

    await eventually(sees_govtest, timeout_s=20)
    return name, stub


@pytest.fixture
async def gateway_factory(
    mesh: Mesh, token: TokenFactory, govtest: object
) -> AsyncIterator[Callable[..., object]]:
    started: list[str] = []

    async def start(*flags: str) -> Stub:
        name, stub = await limited_gateway(mesh, token, *flags)
        started.append(name)
        return stub

    yield start
    for name in started:
        mesh.stop_service(name)


async def outcome(call: object) -> ErrorDetails | common_pb2.Outcome.ValueType:
    try:
        reply = await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return error_details(exc)
    return reply.execution.outcome  # type: ignore[no-any-return]


async def test_concurrency_caps_per_tenant_and_per_provider(
    gateway_factory: Callable[..., object], token: TokenFactory
) -> None:
    stub: Stub = await gateway_factory(  # type: ignore[misc]
        "--tenant-rate-limit",
        "1000/second",
        "--tenant-max-concurrent-executions",
        "2",
        "--provider-max-concurrent-executions",
        "3",
    )
    acme, globex, initech = (token(tenant=t) for t in ("acme", "globex", "initech"))

    def slow(tenant: str, caller: str, key: str | None = None, sleep_ms: int = 2500) -> object:
        record = case(f"c-{uuid.uuid4().hex[:6]}", tenant=tenant)
        return stub.ExecuteAction(
            request("slow", record, key=key, sleep_ms=sleep_ms),
            metadata=bearer(caller),
            timeout=30,
        )

    # The action's deadline is 0.5 s: the callers hear TIMED_OUT, but the provider is
    # still working on all three, so their places stay taken until it answers.
    busy = [outcome(slow("acme", acme)), outcome(slow("acme", acme))]
    busy.append(outcome(slow("globex", globex)))
    assert await asyncio.gather(*busy) == [common_pb2.OUTCOME_TIMED_OUT] * 3

    # acme is at its own cap; globex got in although acme was busy (no starvation).
    refused_key = uuid.uuid4().hex
    tenant_full = await outcome(slow("acme", acme, key=refused_key))
    assert isinstance(tenant_full, ErrorDetails), tenant_full
    assert tenant_full.reason == "TENANT_CONCURRENCY_LIMITED"
    assert tenant_full.retry_after_s is not None and tenant_full.retry_after_s > 0
    # initech is under its own cap, but the provider is at three.
    provider_full = await outcome(slow("initech", initech))
    assert isinstance(provider_full, ErrorDetails), provider_full
    assert provider_full.reason == "PROVIDER_CONCURRENCY_LIMITED"
    assert provider_full.metadata["provider_id"] == "govtest"

    # Once the late answers are in, the places are free again, and the refused call
    # left no row behind: its key runs a (different) request as a fresh execution.
    async def runs_again() -> bool:
        return await outcome(slow("acme", acme, key=refused_key, sleep_ms=1)) == (
            common_pb2.OUTCOME_SUCCEEDED
        )

    await eventually(runs_again, timeout_s=15)


async def test_a_tenant_over_its_rate_is_told_when_to_come_back(
    gateway_factory: Callable[..., object], token: TokenFactory, govtest: object
) -> None:
    stub: Stub = await gateway_factory("--tenant-rate-limit", "4/second")  # type: ignore[misc]
    acme, globex = token(tenant="acme"), token(tenant="globex")

    def discover(tenant: str, caller: str) -> object:
        return stub.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=case("c-rate", tenant=tenant)),
            metadata=bearer(caller),
            timeout=10,
        )

    started = time.monotonic()
    for _ in range(4):
        await discover("acme", acme)  # type: ignore[misc]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await discover("acme", acme)  # type: ignore[misc]
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(raised.value)
    assert details.reason == "TENANT_RATE_LIMITED"
    assert details.retry_after_s is not None
    assert 0 < details.retry_after_s <= 1.0 - (time.monotonic() - started) + 0.05

    await discover("globex", globex)  # type: ignore[misc]  # other tenants are unaffected
    key = uuid.uuid4().hex
    executed = await stub.ExecuteAction(  # executions are counted on their own
        request("slow", case("c-rate", tenant="acme"), key=key, sleep_ms=1),
        metadata=bearer(acme),
        timeout=30,
    )
    assert executed.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert len(provider_calls(govtest, key=key)) == 1  # type: ignore[arg-type]

    await asyncio.sleep(details.retry_after_s)
    await discover("acme", acme)  # type: ignore[misc]  # back after the advertised wait
