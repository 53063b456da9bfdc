"""The governance test provider in the session mesh, as fixtures any test file can use.

Registered through ``pytest_plugins`` in conftest.py: ``govtest`` starts
tests/governance_provider.py once per session, ``gov`` is a gateway stub that
already sees it, and ``case`` builds one of its records.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from actionmesh.mesh import Mesh
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually

Stub = gateway_pb2_grpc.ActionGatewayServiceStub


@pytest.fixture(scope="session")
def govtest(mesh: Mesh) -> Iterator[Path]:
    """The governance provider in the session mesh; yields the folder of its call logs."""
    mesh.start_provider("tests.governance_provider")
    yield mesh.data_dir / "data" / "providers"


@pytest.fixture
async def gov(gateway: Stub, govtest: Path, token: TokenFactory) -> Stub:
    """The gateway stub, once the gateway's directory knows the governance provider."""

    async def visible() -> bool:
        reply = await gateway.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=case("probe"), skip_cache=True),
            metadata=bearer(token(roles=("supervisor",))),
        )
        return any(a.provider_id == "govtest" for a in reply.actions)

    await eventually(visible, timeout_s=20)
    return gateway


def case(
    record_id: str,
    status: str = "open",
    *,
    tenant: str = "acme",
    sensitivity: int = common_pb2.SENSITIVITY_NORMAL,
    version: str = "",
) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(
        tenant=tenant,
        type="govtest",
        id=record_id,
        status=status,
        sensitivity=sensitivity,  # type: ignore[arg-type]
        version=version,
    )
