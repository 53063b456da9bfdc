"""The mesh shipped as containers: built from deploy/docker/Dockerfile, configured by
docker-compose.yml (see tests/containers.py), and used like a user would.

migrate (the cli image) applies every schema to a real PostgreSQL, then registry,
audit log and gateway start with MIGRATE_ON_START=false, and the workitems provider
joins from its own container. The tests run discover -> execute -> history through
the gateway container, follow one trace across three containers to an OTLP
receiver (where compose has its collector), check the images' promises (uid 10001,
read-only root, writable /data, readable secrets, HEALTHCHECK), kill the provider
container, and finally stop every container with SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from testcontainers.core.image import DockerImage

from actionmesh.auditlog.server import SERVICE_NAME as AUDIT_SERVICE
from actionmesh.gateway.auth import mint_token
from actionmesh.gateway.server import SERVICE_NAME as GATEWAY_SERVICE
from actionmesh.provider_cli import new_project
from actionmesh.providers.supportdesk.server import is_healthy
from actionmesh.registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.health import is_serving
from actionmesh.sdk.runtime import SERVICE_NAME as PROVIDER_SERVICE
from actionmesh.v1 import (
    audit_pb2,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import bearer, eventually
from tests.containers import (
    REPO,
    ContainerMesh,
    build_images,
    docker_health,
    require_engine,
    wait_until,
)
from tests.otlp import Receiver, running_receiver
from tests.postgres import PostgresServer

pytestmark = pytest.mark.timeout(900)

TARGETS = (
    "cli",
    "registry",
    "auditlog",
    "gateway",
    "workitems",
    "provider-base",
    "records",
    "escalation",
    "supportdesk",
)
SERVERS = {
    "registry": ("ACTIONMESH_REGISTRY_PORT", REGISTRY_SERVICE),
    "auditlog": ("ACTIONMESH_AUDITLOG_PORT", AUDIT_SERVICE),
    "gateway": ("ACTIONMESH_GATEWAY_PORT", GATEWAY_SERVICE),
    "workitems": ("ACTIONMESH_PROVIDER_PORT", PROVIDER_SERVICE),
    "records": ("ACTIONMESH_PROVIDER_PORT", PROVIDER_SERVICE),
    "escalation": ("ACTIONMESH_PROVIDER_PORT", PROVIDER_SERVICE),
}
# Started by the fixture; records, escalation and the support desk by their own test.
CORE = ("registry", "auditlog", "gateway", "workitems")
# Quicker than production so the test does not wait: spans leave every 200 ms, and a
# provider that stops renewing is gone after 3 s.
FAST_SPANS = {"OTEL_BSP_SCHEDULE_DELAY": "200"}
FAST_REGISTRY = {
    "ACTIONMESH_REGISTRY_LEASE_TTL_S": "3",
    "ACTIONMESH_REGISTRY_HEALTH_CHECK_INTERVAL_S": "0.5",
}


@dataclass
class Deployed:
    containers: ContainerMesh
    receiver: Receiver
    signing_key: str

    def token(self, subject: str = "alice", roles: tuple[str, ...] = ("operator",)) -> str:
        return mint_token(self.signing_key, subject=subject, tenant="acme", roles=roles)


def start_server(
    containers: ContainerMesh, service: str, name: str | None = None, **options: Any
) -> None:
    """Start a compose service and wait (bounded) until it answers its health check."""
    name = name or service
    port_variable, health_name = SERVERS[service]
    extra = FAST_REGISTRY if service == "registry" else {}
    containers.start(
        service, name=name, port_variable=port_variable, env={**FAST_SPANS, **extra}, **options
    )
    wait_until(
        lambda: is_serving(containers.address(name), service=health_name, timeout_s=2),
        timeout_s=90,
        what=f"the {name} container never answered its health check",
        logs=containers.all_logs,
    )


def start_records(containers: ContainerMesh) -> None:
    """The records provider (once): the system of record of tickets, whose facts the
    gateway governs on (a ticket no source vouches for is never executed on)."""
    if "records" not in containers.containers:
        start_server(containers, "records")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    require_engine()
    return build_images(TARGETS)


@pytest.fixture(scope="module")
def deployed(images: dict[str, str], postgres_server: PostgresServer) -> Iterator[Deployed]:
    database = postgres_server.create_database()
    with running_receiver() as receiver:
        containers = ContainerMesh(images, exact={}, substrings={})
        for name in (*SERVERS, "supportdesk"):
            containers.reserve_port(name)
        containers.exact.update(
            {
                containers.document["x-database-url"]: database,
                # How providers are reached: the service name in compose, loopback here.
                **{provider: "127.0.0.1" for provider in ("workitems", "records", "escalation")},
                # compose's registry allow-list names the provider services; here they
                # register loopback endpoints on free ports.
                "workitems:50061,records:50061,escalation:50061": "127.0.0.0/8",
            }
        )
        containers.substrings.update(
            {
                "registry:50051": containers.address("registry"),
                "auditlog:50052": containers.address("auditlog"),
                "http://otel-collector:4317": receiver.endpoint,
                "http://supportdesk:8780": f"http://{containers.address('supportdesk')}",
            }
        )
        try:
            containers.start("migrate")
            code = containers.wait_exit("migrate", timeout_s=120)
            assert code == 0, f"migrate exited {code}\n{containers.logs('migrate')}"
            for service in CORE:
                start_server(containers, service)
            signing_key = (REPO / "deploy/compose/dev-jwt-signing-key").read_text().strip()
            yield Deployed(containers, receiver, signing_key)
        finally:
            containers.remove_all()
            postgres_server.drop_database(database)


def retry_request(item_id: str, status: str) -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=common_pb2.RecordContext(tenant="acme", type="workitem", id=item_id, status=status),
        inputs={"reason": common_pb2.InputValue(string_value="parser fixed")},
        idempotency_key=uuid.uuid4().hex,
    )


async def offers_retry(gateway: gateway_pb2_grpc.ActionGatewayServiceStub, token: str) -> bool:
    reply = await gateway.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(
            record=retry_request("wi-1002", "stuck").record, skip_cache=True
        ),
        metadata=bearer(token),
        timeout=10,
    )
    return any(a.descriptor.action_id == "workitem.retry" and a.available for a in reply.actions)


async def test_discover_execute_history_through_the_containers(deployed: Deployed) -> None:
    containers, token = deployed.containers, deployed.token()
    async with grpc.aio.insecure_channel(containers.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
        await eventually(lambda: offers_retry(gateway, token), timeout_s=30)

        request = retry_request("wi-1001", "failed")
        reply = await gateway.ExecuteAction(request, metadata=bearer(token), timeout=30)
        execution = reply.execution
        assert execution.outcome == common_pb2.OUTCOME_SUCCEEDED, execution
        assert ("status", "failed", "processed") in {
            (c.field, c.before, c.after) for c in execution.changes
        }

        async def both_events() -> list[audit_pb2.AuditEvent]:
            history = await gateway.GetRecordHistory(
                gateway_pb2.GetRecordHistoryRequest(
                    record=common_pb2.RecordRef(type="workitem", id="wi-1001")
                ),
                metadata=bearer(token),
                timeout=10,
            )
            events = [e for e in history.events if e.execution_id == execution.execution_id]
            return events if len(events) == 2 else []

        started, finished = await eventually(both_events, timeout_s=30)  # type: ignore[misc]
    assert started.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
    assert finished.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED and finished.actor == "alice"
    assert finished.external_ref == execution.external_ref

    # The audit chain in the container's PostgreSQL verifies, from the host's CLI.
    verify = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "actionmesh.cli", "audit", "verify"),
        *("--auditlog", containers.address("auditlog")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(verify.communicate(), timeout=60)
    assert verify.returncode == 0, output.decode()

    # One trace across three containers, exported with compose's OTLP settings.
    def whole_trace() -> set[str]:
        services = {s.service for s in deployed.receiver.where(trace_id=execution.trace_id)}
        wanted = {"actionmesh-gateway", "actionmesh-provider-workitems", "actionmesh-auditlog"}
        return services if wanted <= services else set()

    await eventually(whole_trace, timeout_s=30)


async def test_a_team_provider_is_two_lines_on_the_provider_base(
    deployed: Deployed, images: dict[str, str], tmp_path: Path
) -> None:
    """What the README promises a team: FROM the base, COPY the package, CMD; it joins."""
    new_project("teamnotes", tmp_path)
    project = tmp_path / "teamnotes"
    (project / "Dockerfile.base").write_text(
        f"FROM {images['provider-base']}\n"
        "COPY teamnotes/ teamnotes/\n"
        'CMD ["python", "-m", "teamnotes"]\n'
    )
    tag = f"actionmesh-test/teamnotes:{deployed.containers.run_id}"
    image = DockerImage(project, tag=tag, dockerfile_path="Dockerfile.base", network_mode="host")
    with image:
        # The team's action is on tickets: their facts come from the records provider.
        start_records(deployed.containers)
        # The example providers' compose settings, with the team's image.
        start_server(deployed.containers, "workitems", name="teamnotes", image=tag)
        token = deployed.token()
        note = gateway_pb2.ExecuteActionRequest(
            action_id="teamnotes.add_note",
            record=common_pb2.RecordContext(
                tenant="acme", type="ticket", id="t-100", status="open"
            ),
            inputs={"text": common_pb2.InputValue(string_value="called the customer")},
            idempotency_key=uuid.uuid4().hex,
        )
        async with grpc.aio.insecure_channel(deployed.containers.address("gateway")) as channel:
            gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

            async def offered() -> bool:
                reply = await gateway.DiscoverActions(
                    gateway_pb2.DiscoverActionsRequest(record=note.record, skip_cache=True),
                    metadata=bearer(token),
                    timeout=10,
                )
                return any(
                    a.descriptor.action_id == "teamnotes.add_note" and a.available
                    for a in reply.actions
                )

            await eventually(offered, timeout_s=30)
            reply = await gateway.ExecuteAction(note, metadata=bearer(token), timeout=30)
        assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED, reply.execution
        assert reply.execution.external_ref == "note-1"
        assert run_in(deployed.containers, "teamnotes", "id", "-u") == (0, "10001")
        deployed.containers.remove("teamnotes")


async def test_the_other_example_providers_and_the_support_desk_join(
    deployed: Deployed,
) -> None:
    """records and escalation join; escalation calls the support desk's container."""
    containers = deployed.containers
    containers.start("supportdesk", port_variable="ACTIONMESH_SUPPORTDESK_PORT")
    desk = f"http://{containers.address('supportdesk')}"
    wait_until(
        lambda: is_healthy(desk, 2.0),
        timeout_s=90,
        what="the support desk container never answered",
        logs=containers.all_logs,
    )
    start_records(containers)
    start_server(containers, "escalation")
    token = deployed.token()
    # A demo ticket of the records provider (its system of record).
    ticket = common_pb2.RecordContext(tenant="acme", type="ticket", id="t-100", status="open")
    async with grpc.aio.insecure_channel(containers.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

        async def offered() -> set[str]:
            reply = await gateway.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=ticket, skip_cache=True),
                metadata=bearer(token),
                timeout=10,
            )
            ids = {a.descriptor.action_id for a in reply.actions if a.available}
            return ids if {"case.escalate", "ticket.update_routing"} <= ids else set()

        await eventually(offered, timeout_s=30)
        reply = await gateway.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id="case.escalate",
                record=ticket,
                inputs={
                    "summary": common_pb2.InputValue(string_value="Refund stuck for 3 days"),
                    "severity": common_pb2.InputValue(string_value="critical"),
                },
                idempotency_key=uuid.uuid4().hex,
            ),
            metadata=bearer(token),
            timeout=30,
        )
        # Long-running: accepted at once, finished when the support team acknowledges
        # the escalation at the desk's container.
        accepted = reply.execution
        assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED, accepted

        async def current() -> gateway_pb2.Execution:
            found = await gateway.GetExecution(
                gateway_pb2.GetExecutionRequest(execution_id=accepted.execution_id),
                metadata=bearer(token),
                timeout=10,
            )
            return found.execution

        async def opened() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(base_url=desk, timeout=5) as http:
                listed = await http.get("/v1/escalations", params={"tenant": "acme"})
                return list(listed.json()["escalations"]) if listed.status_code == 200 else []

        [held] = await eventually(opened, timeout_s=30)
        async with httpx.AsyncClient(base_url=desk, timeout=5) as http:
            acked = await http.post(
                f"/v1/escalations/{held['id']}/acknowledge", json={"by": "carol"}
            )
            assert acked.status_code == 200, acked.text

        async def finished() -> gateway_pb2.Execution | None:
            found = await current()
            return found if found.outcome != common_pb2.OUTCOME_ACCEPTED else None

        final = await eventually(finished, timeout_s=60)
        assert isinstance(final, gateway_pb2.Execution)
        assert final.outcome == common_pb2.OUTCOME_SUCCEEDED, final
        assert final.external_ref == held["id"], final


def run_in(containers: ContainerMesh, name: str, *command: str) -> tuple[int, str]:
    code, output = containers.container(name).exec_run(list(command))
    return int(code), bytes(output).decode(errors="replace").strip()


def test_the_images_keep_their_promises(deployed: Deployed) -> None:
    containers = deployed.containers
    running = [name for name in containers.containers if name != "migrate"]
    assert len(running) == 7, running
    for name in running:
        attributes: dict[str, Any] = containers.container(name).attrs
        assert attributes["Config"]["User"] == "10001:10001"
        assert attributes["HostConfig"]["ReadonlyRootfs"] is True
        assert run_in(containers, name, "id", "-u") == (0, "10001")
        code, output = run_in(containers, name, "touch", "/opt/venv/probe")
        assert code != 0 and "Read-only file system" in output, (name, output)
        # The final stage holds the virtualenv, not the sources or build tools.
        assert run_in(containers, name, "test", "-e", "/src")[0] != 0
    # /data is the provider's writable store (a volume owned by uid 10001) ...
    assert run_in(containers, "workitems", "touch", "/data/probe")[0] == 0
    code, output = run_in(containers, "workitems", "ls", "/data")
    assert "workitems.db" in output, output
    # ... and the secrets compose mounts are readable by the unprivileged user.
    assert run_in(containers, "gateway", "cat", "/run/secrets/jwt-signing-key")[0] == 0
    # The engine's own HEALTHCHECK (the image's grpc.health.v1 probe) says healthy.
    for name in running:
        wait_until(
            lambda name=name: docker_health(containers.container(name)) == "healthy",
            timeout_s=60,
            what=f"docker never reported {name} healthy",
            logs=lambda name=name: str(containers.container(name).attrs["State"]["Health"]),
        )


async def test_a_killed_provider_container_gives_unavailable_then_leaves_the_registry(
    deployed: Deployed,
) -> None:
    containers, token = deployed.containers, deployed.token()
    containers.container("workitems").kill()  # SIGKILL: no deregistration, only the lease
    async with (
        grpc.aio.insecure_channel(containers.address("gateway")) as gateway_channel,
        grpc.aio.insecure_channel(containers.address("registry")) as registry_channel,
    ):
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(gateway_channel)
        registry = registry_pb2_grpc.RegistryServiceStub(registry_channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            reply = await gateway.ExecuteAction(
                retry_request("wi-1002", "stuck"), metadata=bearer(token), timeout=30
            )
            pytest.fail(f"expected UNAVAILABLE, got {reply.execution}")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # The provider is also the work items' system of record: until the gateway hears
        # that it is not serving, it meets it first as the record's source.
        assert error_details(raised.value).reason in (
            "PROVIDER_UNAVAILABLE",
            "RECORD_SOURCE_UNAVAILABLE",
        )

        async def gone() -> bool:
            reply = await registry.ListProviders(registry_pb2.ListProvidersRequest(), timeout=5)
            return all(p.provider_id != "workitems" for p in reply.providers)

        await eventually(gone, timeout_s=30)

        # A replacement container on the same volume rejoins and finds its data: the
        # item retried in the first test is processed now, so a retry is refused.
        start_server(containers, "workitems", name="workitems-again", volumes_of="workitems")
        await eventually(lambda: offers_retry(gateway, token), timeout_s=30)
        again = await gateway.ExecuteAction(
            retry_request("wi-1001", "failed"), metadata=bearer(token), timeout=30
        )
        assert again.execution.outcome == common_pb2.OUTCOME_REJECTED, again.execution
        stuck = await gateway.ExecuteAction(
            retry_request("wi-1002", "stuck"), metadata=bearer(token), timeout=30
        )
        assert stuck.execution.outcome == common_pb2.OUTCOME_SUCCEEDED, stuck.execution


def test_every_container_stops_cleanly_on_sigterm(deployed: Deployed) -> None:
    containers = deployed.containers
    # The gateway first (it drains and ships its outbox), the registry last.
    names = ["gateway", *(n for n in containers.containers if n not in ("gateway", "registry"))]
    for name in [*names, "registry"]:
        if name in ("migrate", "workitems"):  # ran once; killed by the test before
            continue
        container = containers.container(name)
        container.stop(timeout=15)
        code = containers.wait_exit(name, timeout_s=30)
        assert code == 0, f"{name} exited {code} on SIGTERM\n{containers.logs(name)}"
    # Stopping the provider deregistered it before the lease could expire; nothing to
    # ask any more, but its log says so.
    assert "deregistered workitems" in containers.logs("workitems-again", lines=200)
