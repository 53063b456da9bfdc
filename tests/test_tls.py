"""Mutual TLS between every service: the flow over mTLS, and who is refused.

One mesh of real processes (registry, audit log, gateway, workitems provider)
runs with ``MeshSettings(tls=True)``: a development CA and one certificate per
service. A second, unrelated development CA plays the attacker: its certificates
look just as valid, but nobody in the mesh trusts them.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh import cli
from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.devpki import create_dev_pki
from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.rpc import health as health_probe
from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.tls import TlsConfig, TlsConfigError
from actionmesh.runtime.db import sqlite_url
from actionmesh.sdk import ActionContext, NoInputs, Provider, ProviderConfig, Result, start_provider
from actionmesh.v1 import (
    audit_pb2,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import TEST_MESH, bearer, eventually

CALL_TIMEOUT_S = 5.0
# The gRPC services of the mesh; a refusal must hold for each of them.
SERVICES = ("registry", "auditlog", "gateway", "workitems")
# Services that demand a client certificate (the gateway only when told to).
MUTUAL = ("registry", "auditlog", "workitems")


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    settings = {**TEST_MESH, "provider_modules": ("actionmesh.providers.workitems",), "tls": True}
    mesh = Mesh(MeshSettings(data_dir=tmp_path_factory.mktemp("tls-mesh"), **settings))  # type: ignore[arg-type]
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def client_tls(tls_mesh: Mesh) -> TlsConfig:
    tls = tls_mesh.client_tls
    assert tls is not None
    return tls


@pytest.fixture(scope="module")
def rogue_tls(tmp_path_factory: pytest.TempPathFactory, client_tls: TlsConfig) -> TlsConfig:
    """A certificate from another CA, named like a mesh member, that trusts the mesh's CA.

    Trusting the mesh's CA lets the handshake verify the *server*; only the
    server's check of this client's certificate can refuse it.
    """
    other = create_dev_pki(tmp_path_factory.mktemp("rogue-pki"), ["gateway", "intruder"])
    cert_file, key_file = other.files("gateway")
    return TlsConfig(str(cert_file), str(key_file), client_tls.ca_file)


def token(tls_mesh: Mesh, **claims: object) -> str:
    return mint_token(
        tls_mesh.signing_key(),
        subject=str(claims.get("subject", "alice")),
        tenant=str(claims.get("tenant", "acme")),
        roles=("operator",),
        ttl_s=600.0,
    )


async def health_status(address: str, tls: TlsConfig | None) -> int:
    async with open_channel(address, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
    return int(reply.status)


async def refused(address: str, tls: TlsConfig | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health_status(address, tls)
    return raised.value.code()


# -- the development PKI ---------------------------------------------------------------
def test_dev_pki_issues_workload_certificates_and_reuses_them(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path, ["registry", "gateway"])
    cert_file, key_file = pki.files("gateway")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "gateway"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["actionmesh://gateway"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for key in (key_file, pki.ca_key_file):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = create_dev_pki(tmp_path, ["registry", "gateway", "auditlog"])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # Reused, not reissued: a running mesh keeps trusting what it was started with.
    assert {name: after[name] for name in before} == before
    x509.load_pem_x509_certificate(
        again.files("auditlog")[0].read_bytes()
    ).verify_directly_issued_by(ca)


def test_tls_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path / "a", ["svc"])
    other = create_dev_pki(tmp_path / "b", ["svc"])
    cert, key = (str(p) for p in pki.files("svc"))
    ca = str(pki.ca_file)
    problems = {
        TlsConfig(cert_file=cert, ca_file=ca): "tls_cert_file is set but tls_key_file is not",
        TlsConfig(cert, key): "tls_ca_file is not set",
        TlsConfig(ca_file=ca): "a service needs its own certificate and key",
        TlsConfig(cert, str(other.files("svc")[1]), ca): "is not the key of tls_cert_file",
        TlsConfig(cert, key, str(tmp_path / "nope.pem")): "tls_ca_file",
        TlsConfig(cert, ca, ca): "is not an unencrypted PEM private key",
    }
    for config, message in problems.items():
        with pytest.raises(TlsConfigError, match=message):
            config.check(server=True)
    TlsConfig(cert, key, ca).check(server=True)
    # A client may verify the server without presenting a certificate of its own.
    TlsConfig(ca_file=ca).check(server=False)


# -- the mesh over mutual TLS ----------------------------------------------------------
async def test_discover_execute_history_over_mutual_tls(
    tls_mesh: Mesh, client_tls: TlsConfig
) -> None:
    # Registration (provider -> registry) and health checks (registry -> provider) ran
    # over mTLS: the provider is listed and SERVING.
    async with open_channel(tls_mesh.address("registry"), client_tls) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)

        async def workitems_serving() -> bool:
            reply = await registry.ListProviders(
                registry_pb2.ListProvidersRequest(), timeout=CALL_TIMEOUT_S
            )
            return any(
                p.provider_id == "workitems" and p.health == registry_pb2.PROVIDER_HEALTH_SERVING
                for p in reply.providers
            )

        await eventually(workitems_serving)

    alice = bearer(token(tls_mesh))
    record = common_pb2.RecordContext(tenant="acme", type="workitem", id="wi-1001", status="failed")
    async with open_channel(tls_mesh.address("gateway"), client_tls) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
        # Gateway -> provider Discover over mTLS.
        found = await gateway.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=record),
            metadata=alice,
            timeout=CALL_TIMEOUT_S,
        )
        views = {a.descriptor.action_id: a for a in found.actions}
        assert views["workitem.retry"].available
        assert not found.degraded_providers
        # Gateway -> provider Execute over mTLS.
        reply = await gateway.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id="workitem.retry",
                record=record,
                inputs={"reason": common_pb2.InputValue(string_value="parser fixed")},
                idempotency_key=uuid.uuid4().hex,
            ),
            metadata=alice,
            timeout=CALL_TIMEOUT_S,
        )
        execution = reply.execution
        assert execution.outcome == common_pb2.OUTCOME_SUCCEEDED
        assert ("status", "failed", "processed") in {
            (c.field, c.before, c.after) for c in execution.changes
        }

        # Gateway outbox -> audit log and gateway -> audit log history reads over mTLS.
        async def both_events() -> list[audit_pb2.AuditEvent]:
            history = await gateway.GetRecordHistory(
                gateway_pb2.GetRecordHistoryRequest(
                    record=common_pb2.RecordRef(type="workitem", id="wi-1001")
                ),
                metadata=alice,
                timeout=CALL_TIMEOUT_S,
            )
            events = [e for e in history.events if e.execution_id == execution.execution_id]
            return events if len(events) == 2 else []

        events = await eventually(both_events)
        started, finished = cast(list[audit_pb2.AuditEvent], events)
    assert started.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert finished.trace_id == execution.trace_id


@pytest.mark.parametrize("service", SERVICES)
async def test_plaintext_clients_are_refused(tls_mesh: Mesh, service: str) -> None:
    assert await refused(tls_mesh.address(service), None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", MUTUAL)
async def test_certificate_from_another_ca_is_refused(
    tls_mesh: Mesh, client_tls: TlsConfig, rogue_tls: TlsConfig, service: str
) -> None:
    address = tls_mesh.address(service)
    assert await refused(address, rogue_tls) == grpc.StatusCode.UNAVAILABLE
    # Without any client certificate too; with the mesh's own, the same call works.
    no_cert = TlsConfig(ca_file=client_tls.ca_file)
    assert await refused(address, no_cert) == grpc.StatusCode.UNAVAILABLE
    assert await health_status(address, client_tls) == health_pb2.HealthCheckResponse.SERVING


async def test_gateway_asks_for_client_certificates_only_when_configured(
    tls_mesh: Mesh, client_tls: TlsConfig, rogue_tls: TlsConfig
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    # By default the gateway's callers are identified by their JWTs: TLS, no client cert.
    open_gateway = tls_mesh.address("gateway")
    assert await health_status(open_gateway, TlsConfig(ca_file=client_tls.ca_file)) == serving

    tls_mesh.start_gateway("gateway-mtls", "--tls-require-client-cert", "true")
    try:
        strict = tls_mesh.address("gateway-mtls")
        assert await refused(strict, rogue_tls) == grpc.StatusCode.UNAVAILABLE
        no_cert = TlsConfig(ca_file=client_tls.ca_file)
        assert await refused(strict, no_cert) == grpc.StatusCode.UNAVAILABLE
        assert await health_status(strict, client_tls) == serving
    finally:
        tls_mesh.stop_service("gateway-mtls")


async def test_a_client_certificate_names_a_trusted_caller_only_under_mutual_tls(
    tls_mesh: Mesh, client_tls: TlsConfig
) -> None:
    # The backend's certificate (URI SAN actionmesh://backend) vouches for `thing` facts.
    backend = tls_mesh.tls_for("backend")
    assert backend is not None
    trusted = "actionmesh://backend=thing"
    claim = gateway_pb2.DiscoverActionsRequest(
        record=common_pb2.RecordContext(tenant="acme", type="thing", id="t-1", status="open")
    )

    async def facts(address: str, tls: TlsConfig) -> common_pb2.RecordFacts:
        async with open_channel(address, tls) as channel:
            reply = await gateway_pb2_grpc.ActionGatewayServiceStub(channel).DiscoverActions(
                claim, metadata=bearer(token(tls_mesh)), timeout=CALL_TIMEOUT_S
            )
        return reply.facts

    tls_mesh.start_gateway(
        "gateway-vouch", "--tls-require-client-cert", "true", "--trusted-callers", trusted
    )
    tls_mesh.start_gateway("gateway-tls-only", "--trusted-callers", trusted)
    try:
        vouched = await facts(tls_mesh.address("gateway-vouch"), backend)
        assert (vouched.source, vouched.vouched_by) == (
            common_pb2.FACT_SOURCE_TRUSTED_CALLER,
            "actionmesh://backend",
        )
        # Another certificate of the same CA is not the listed identity.
        other = await facts(tls_mesh.address("gateway-vouch"), client_tls)
        assert other.source == common_pb2.FACT_SOURCE_UNVERIFIED
        # Without mutual TLS the gateway never asks for (nor believes) a client certificate.
        unasked = await facts(tls_mesh.address("gateway-tls-only"), backend)
        assert unasked.source == common_pb2.FACT_SOURCE_UNVERIFIED
    finally:
        tls_mesh.stop_service("gateway-vouch")
        tls_mesh.stop_service("gateway-tls-only")


async def test_server_with_untrusted_certificate_is_not_believed(
    tls_mesh: Mesh, rogue_tls: TlsConfig
) -> None:
    # A client that trusts only the rogue CA cannot verify the mesh's servers either.
    rogue_only = TlsConfig(
        rogue_tls.cert_file, rogue_tls.key_file, str(Path(rogue_tls.cert_file).parent / "ca.pem")
    )
    assert await refused(tls_mesh.address("gateway"), rogue_only) == grpc.StatusCode.UNAVAILABLE


async def test_provider_with_untrusted_certificate_cannot_register(
    tls_mesh: Mesh, rogue_tls: TlsConfig, tmp_path: Path
) -> None:
    intruder = Provider("intruder", version="1.0.0")

    @intruder.action("intruder.poke", record_types=["workitem"])
    async def poke(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    rogue_dir = Path(rogue_tls.cert_file).parent
    config = ProviderConfig(
        registry=tls_mesh.address("registry"),
        data_dir=str(tmp_path),
        registry_retry_max_s=0.2,
        tls_cert_file=str(rogue_dir / "intruder.pem"),
        tls_key_file=str(rogue_dir / "intruder-key.pem"),
        # It trusts the mesh's CA, so only the registry's check of its certificate fails.
        tls_ca_file=rogue_tls.ca_file,
    )
    running = await start_provider(intruder, config)
    try:
        link = intruder.registration
        assert link is not None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(link.registered.wait(), 2.0)
    finally:
        await running.stop(1.0)
    client = tls_mesh.client_tls
    async with open_channel(tls_mesh.address("registry"), client) as channel:
        reply = await registry_pb2_grpc.RegistryServiceStub(channel).ListProviders(
            registry_pb2.ListProvidersRequest(), timeout=CALL_TIMEOUT_S
        )
    assert "intruder" not in {p.provider_id for p in reply.providers}
    assert "workitems" in {p.provider_id for p in reply.providers}


# -- clients and probes ----------------------------------------------------------------
def test_cli_connects_with_the_running_mesh_certificates(
    tls_mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = str(tls_mesh.data_dir)
    with pytest.raises(SystemExit) as ended:
        cli.main(["--data-dir", data_dir, "providers", "--json"])
    assert ended.value.code == 0
    assert "workitems" in capsys.readouterr().out

    # Explicit flags win over the mesh state: half a client identity is refused up front.
    client = tls_mesh.client_tls
    assert client is not None
    with pytest.raises(SystemExit) as ended:
        cli.main(["--data-dir", data_dir, "providers", "--tls-cert", client.cert_file])
    assert ended.value.code == 1
    assert "--tls-cert is set but --tls-key is not" in capsys.readouterr().out

    # A mesh state from elsewhere (no TLS recorded): a plaintext attempt is UNAVAILABLE.
    with pytest.raises(SystemExit) as ended:
        cli.main(
            [
                "--data-dir",
                str(tmp_path),
                "providers",
                "--registry",
                tls_mesh.address("registry"),
                "--timeout",
                "3",
            ]
        )
    assert ended.value.code == 2
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_container_health_probe_uses_the_service_certificate(
    tls_mesh: Mesh, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = tls_mesh.tls_for("registry")
    assert tls is not None
    address = tls_mesh.address("registry")
    argv = [address, "--service", "actionmesh.v1.RegistryService"]
    # What a Dockerfile HEALTHCHECK runs: no TLS flags, the service's own variables.
    assert health_probe.main(argv) == 1
    monkeypatch.setenv("ACTIONMESH_REGISTRY_TLS_CERT_FILE", tls.cert_file)
    monkeypatch.setenv("ACTIONMESH_REGISTRY_TLS_KEY_FILE", tls.key_file)
    monkeypatch.setenv("ACTIONMESH_REGISTRY_TLS_CA_FILE", tls.ca_file)
    assert health_probe.main(argv) == 0
    assert capsys.readouterr().out.split() == ["NOT", "SERVING", "SERVING"]


async def test_health_probe_checks_the_name_in_the_service_certificate(tmp_path: Path) -> None:
    # A production-like certificate names the service's DNS name, not 127.0.0.1, which is
    # where a container HEALTHCHECK connects; the probe checks that name instead.
    pki = create_dev_pki(tmp_path / "pki", ["auditlog"], hosts=("audit.mesh.internal",))
    cert, key = (str(p) for p in pki.files("auditlog"))
    running = await start_auditlog(
        AuditLogConfig(
            database_url=sqlite_url(tmp_path / "audit.db"),
            tls_cert_file=cert,
            tls_key_file=key,
            tls_ca_file=str(pki.ca_file),
        )
    )
    env = {k: v for k, v in os.environ.items() if "_TLS_" not in k}
    env |= {
        "ACTIONMESH_AUDITLOG_TLS_CERT_FILE": cert,
        "ACTIONMESH_AUDITLOG_TLS_KEY_FILE": key,
        "ACTIONMESH_AUDITLOG_TLS_CA_FILE": str(pki.ca_file),
    }

    async def probe(*flags: str) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "actionmesh.rpc.health",
            running.address,
            "--service",
            "actionmesh.v1.AuditService",
            *flags,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode().strip()

    try:
        assert await probe() == (0, "SERVING")
        assert await probe("--tls-server-name", "someone-else.example") == (1, "NOT SERVING")
    finally:
        await running.stop(1.0)


# -- configuration errors stop a service -----------------------------------------------
@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        (
            "actionmesh.registry",
            ["--tls-cert-file", "{cert}"],
            "tls_cert_file is set but tls_key_file",
        ),
        (
            "actionmesh.auditlog",
            ["--tls-cert-file", "{cert}", "--tls-key-file", "{key}"],
            "tls_ca_file is not set",
        ),
        (
            "actionmesh.providers.workitems",
            ["--tls-cert-file", "{cert}", "--tls-key-file", "{missing}", "--tls-ca-file", "{ca}"],
            "tls_key_file {missing}: No such file or directory",
        ),
    ],
)
def test_incomplete_tls_settings_stop_the_service_with_one_line(
    tmp_path: Path, module: str, flags: list[str], message: str
) -> None:
    pki = create_dev_pki(tmp_path / "pki", ["svc"])
    cert, key = pki.files("svc")
    names = {"cert": cert, "key": key, "ca": pki.ca_file, "missing": tmp_path / "gone.pem"}
    argv = [flag.format(**names) for flag in flags]
    ended = subprocess.run(
        [sys.executable, "-m", module, "--port", "0", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "ACTIONMESH_LOG_LEVEL": "WARNING"},
    )
    assert ended.returncode == 2
    last = ended.stderr.strip().splitlines()[-1]
    assert message.format(**names) in last
    assert "Traceback" not in ended.stderr
