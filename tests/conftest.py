"""Shared fixtures: a real mesh of processes on 127.0.0.1 with free ports."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from actionmesh.gateway.auth import SERVICE_METADATA, mint_service_token, mint_token
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.v1 import gateway_pb2_grpc

# The throwaway PostgreSQL fixtures (postgres_server, postgres_url) for any test file.
pytest_plugins = ["tests.postgres", "tests.governance_fixtures"]

SERVICE_CLIENT = "test-backend"
# The tests play the product backend that vouches for the test providers' records (they
# have no system of record); workitem and ticket facts come from their sources.
TRUSTED_RECORD_TYPES = ("govtest", "faultrec", "tokenprobe", "thing", "order", "case", "lrjob")
TRUSTED_CALLERS = f"{SERVICE_CLIENT}=" + ",".join(TRUSTED_RECORD_TYPES)

TEST_MESH = dict(
    registry_port=0,
    auditlog_port=0,
    gateway_port=0,
    supportdesk_port=0,
    webhook_receiver_port=0,
    lease_ttl_s=2.0,
    health_check_interval_s=0.3,
    extra_env={
        "ACTIONMESH_LOG_LEVEL": "INFO",
        "ACTIONMESH_GATEWAY_TRUSTED_CALLERS": TRUSTED_CALLERS,
    },
)


def gateway_settings(mesh: Mesh | None = None, **settings: Any) -> dict[str, Any]:
    """GatewayConfig keyword arguments for a gateway a test starts itself.

    The test backend is a trusted caller, as in TEST_MESH; with ``mesh``, the gateway
    uses its registry, audit log and signing key (development mode). ``settings`` add
    to or override these.
    """
    values: dict[str, Any] = {"trusted_callers": TRUSTED_CALLERS}
    if mesh is not None:
        values.update(
            registry=mesh.address("registry"),
            auditlog=mesh.address("auditlog"),
            jwt_secret_file=str(mesh.signing_key_path),
            jwt_dev_mode=True,
        )
    values.update(settings)
    return values


class Vouching(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends the test backend's own service token with every call (a trusted caller)."""

    def __init__(self, token: str) -> None:
        self._entry = (SERVICE_METADATA, f"Bearer {token}")

    async def intercept_unary_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        vouched = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(vouched, request)


def service_token(mesh: Mesh) -> str:
    """The test backend's own token (a service token, not an operator's)."""
    return mint_service_token(mesh.signing_key(), client_id=SERVICE_CLIENT, ttl_s=86400.0)


def vouching_channel(
    mesh: Mesh,
    address: str | None = None,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    token: str | None = None,
) -> grpc.aio.Channel:
    """A channel to the gateway on which the test backend vouches for record facts."""
    vouching = Vouching(token or service_token(mesh))
    return grpc.aio.insecure_channel(
        address or mesh.address("gateway"), options=options, interceptors=[vouching]
    )


def start_mesh(data_dir: Path) -> Mesh:
    mesh = Mesh(MeshSettings(data_dir=data_dir, **TEST_MESH))  # type: ignore[arg-type]
    mesh.start()
    return mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """Registry, audit log, gateway and the workitems provider as real processes."""
    running = start_mesh(tmp_path_factory.mktemp("mesh"))
    try:
        yield running
    finally:
        running.stop()


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def token(mesh: Mesh) -> TokenFactory:
    """Mint a token signed with the mesh's development key."""

    def mint(
        subject: str = "alice",
        tenant: str = "acme",
        roles: tuple[str, ...] = ("operator",),
        ttl_s: float = 600.0,
        now: float | None = None,
    ) -> str:
        return mint_token(
            mesh.signing_key(), subject=subject, tenant=tenant, roles=roles, ttl_s=ttl_s, now=now
        )

    return mint


@pytest.fixture
async def gateway(mesh: Mesh) -> AsyncIterator[gateway_pb2_grpc.ActionGatewayServiceStub]:
    async with vouching_channel(mesh) as channel:
        yield gateway_pb2_grpc.ActionGatewayServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def eventually(check: Callable[[], object], timeout_s: float = 10.0) -> object:
    """Poll an async or sync check until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s (last value: {last!r})")
