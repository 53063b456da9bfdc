"""Shared fixtures: a real mesh of processes on 127.0.0.1 with free ports."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest

from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.v1 import gateway_pb2_grpc

# The throwaway PostgreSQL fixtures (postgres_server, postgres_url) for any test file.
pytest_plugins = ["tests.postgres", "tests.governance_fixtures"]

TEST_MESH = dict(
    registry_port=0,
    auditlog_port=0,
    gateway_port=0,
    supportdesk_port=0,
    lease_ttl_s=2.0,
    health_check_interval_s=0.3,
    extra_env={"ACTIONMESH_LOG_LEVEL": "INFO"},
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
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
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
