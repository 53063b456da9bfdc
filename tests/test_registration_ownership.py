"""Registration ownership and the endpoint allow-list, against real registry servers.

A provider id belongs to the credential (bearer token or verified client
certificate) that first registered it: another credential can neither register,
renew nor deregister it, across lease expiry, deregistration and registry restarts,
until an operator releases it. Endpoints must be on the operator's allow-list.
Every registry here is started by ``start_registry`` (what ``python -m actionmesh.registry``
runs) on 127.0.0.1 port 0, against a SQLite file of the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest

from actionmesh.devpki import create_dev_pki
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.registry.config import ENV_PREFIX, RegistryConfig
from actionmesh.registry.endpoints import EndpointAllowList, EndpointPattern
from actionmesh.registry.model import Health
from actionmesh.registry.model import Provider as StoredProvider
from actionmesh.registry.server import start_registry
from actionmesh.registry.storage import OwnedByAnother, ProviderRepository
from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.config import load_config
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import ErrorDetails, FieldViolation, error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.rpc.tls import TlsConfig
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.sdk import ActionContext, NoInputs, Provider, ProviderConfig, Result, start_provider
from actionmesh.sdk.registration import RegistryLink
from actionmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 5.0
TOKEN_A = "token-a-" + "a" * 24
TOKEN_B = "token-b-" + "b" * 24
OWNED = "PROVIDER_OWNED_BY_ANOTHER_CREDENTIAL"


# --- helpers ---------------------------------------------------------------------------


def stub_for(channel: grpc.aio.Channel) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    # Only the type stubs know the async stub; at run time it is RegistryServiceStub.
    return cast(
        "registry_pb2_grpc.RegistryServiceAsyncStub", registry_pb2_grpc.RegistryServiceStub(channel)
    )


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def registration(
    provider_id: str, endpoint: str = "127.0.0.1:50061", action_id: str = ""
) -> registry_pb2.RegisterProviderRequest:
    return registry_pb2.RegisterProviderRequest(
        provider_id=provider_id,
        endpoint=endpoint,
        version="1.0.0",
        actions=[
            common_pb2.ActionDescriptor(
                action_id=action_id or f"{provider_id.replace('-', '_')}.act",
                label="Act",
                record_types=["workitem"],
                risk=common_pb2.RISK_LOW,
            )
        ],
    )


class Caller:
    """One credential talking to one registry: register, renew, deregister, list."""

    def __init__(
        self, stub: registry_pb2_grpc.RegistryServiceAsyncStub, token: str | None = None
    ) -> None:
        self.stub = stub
        self.metadata = bearer(token)

    async def register(self, provider_id: str, endpoint: str = "127.0.0.1:50061") -> str:
        reply = await self.stub.RegisterProvider(
            registration(provider_id, endpoint), metadata=self.metadata, timeout=WAIT_S
        )
        return reply.lease_id

    async def renew(self, provider_id: str, lease_id: str) -> None:
        await self.stub.RenewLease(
            registry_pb2.RenewLeaseRequest(provider_id=provider_id, lease_id=lease_id),
            metadata=self.metadata,
            timeout=WAIT_S,
        )

    async def deregister(self, provider_id: str, lease_id: str) -> None:
        await self.stub.DeregisterProvider(
            registry_pb2.DeregisterProviderRequest(provider_id=provider_id, lease_id=lease_id),
            metadata=self.metadata,
            timeout=WAIT_S,
        )

    async def endpoints(self) -> dict[str, str]:
        reply = await self.stub.ListProviders(registry_pb2.ListProvidersRequest(), timeout=WAIT_S)
        return {p.provider_id: p.endpoint for p in reply.providers}


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert (details.code, details.reason) == (code, reason), details
    return details


def reveals_nothing(details: ErrorDetails, *secrets: str) -> None:
    """A refusal names neither the owner's token, nor its hash, nor its certificate."""
    shown = details.message + json.dumps(details.metadata)
    for secret in secrets:
        assert secret not in shown
        assert hashlib.sha256(secret.encode()).hexdigest() not in shown
    assert "token:" not in shown and "cert:" not in shown


class Registries:
    """Registries on free ports over one SQLite file; channels and servers cleaned up."""

    def __init__(self, db_path: Path) -> None:
        self.database_url = sqlite_url(db_path)
        self.running: list[RunningServer] = []
        self.channels: list[grpc.aio.Channel] = []

    async def start(self, **settings: Any) -> RunningServer:
        config = RegistryConfig(
            **{
                "port": 0,
                "database_url": self.database_url,
                "health_check_interval_s": 5.0,
                **settings,
            }
        )
        running = await start_registry(config)
        self.running.append(running)
        return running

    def caller(
        self, running: RunningServer, token: str | None = None, tls: TlsConfig | None = None
    ) -> Caller:
        channel = open_channel(running.address, tls)
        self.channels.append(channel)
        return Caller(stub_for(channel), token)

    async def stop(self, running: RunningServer) -> None:
        self.running.remove(running)
        await running.stop(0.5)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for running in list(self.running):
            await self.stop(running)


@pytest.fixture
async def registries(tmp_path: Path) -> AsyncIterator[Registries]:
    handle = Registries(tmp_path / "registry.db")
    yield handle
    await handle.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The operator command, as a separate process on the registry's database."""
    return subprocess.run(
        [sys.executable, "-m", "actionmesh.registry_cli", "registry", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


# --- the store: one owner per id, also when two registries race -------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "race.db")
    return str(request.getfixturevalue("postgres_url"))


def stored(provider_id: str) -> StoredProvider:
    now = utcnow()
    return StoredProvider(
        provider_id=provider_id,
        endpoint="127.0.0.1:1",
        version="1",
        actions=(),
        lease_id=uuid.uuid4().hex,
        lease_expires_at=now + timedelta(seconds=30),
        registered_at=now,
        health=Health.UNKNOWN,
    )


def register_racing(
    store: ProviderRepository,
    provider_id: str,
    owner: str,
    barrier: threading.Barrier,
    outcomes: dict[str, str],
) -> None:
    barrier.wait(timeout=10)
    try:
        store.register(stored(provider_id), owner)
        outcomes[owner] = "won"
    except OwnedByAnother:
        outcomes[owner] = "refused"


def test_two_registries_racing_for_one_id_bind_it_to_exactly_one_credential(
    database_url: str,
) -> None:
    engines = [make_engine(database_url) for _ in range(2)]
    try:
        stores = [ProviderRepository(engine) for engine in engines]
        stores[0].create_schema()
        for round_ in range(8):
            provider_id = f"contested-{round_}"
            barrier = threading.Barrier(2)
            outcomes: dict[str, str] = {}

            threads = [
                threading.Thread(
                    target=register_racing,
                    args=(store, provider_id, owner, barrier, outcomes),
                )
                for store, owner in zip(stores, ("token:a", "token:b"), strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=20)
            assert sorted(outcomes.values()) == ["refused", "won"], outcomes
            winner = next(owner for owner, outcome in outcomes.items() if outcome == "won")
            bound = stores[1].owner_of(provider_id)
            assert bound is not None and bound.owner == winner
            # The winner's registration is there, whole.
            assert stores[0].get(provider_id) is not None
    finally:
        for engine in engines:
            engine.dispose()


# --- ownership with bearer tokens -------------------------------------------------------


async def test_the_first_registrant_owns_the_id_and_no_other_credential_can_touch_it(
    registries: Registries,
) -> None:
    running = await registries.start()
    owner = registries.caller(running, TOKEN_A)
    other = registries.caller(running, TOKEN_B)
    anonymous = registries.caller(running)
    lease = await owner.register("workitems", "127.0.0.1:50061")

    for intruder in (other, anonymous):
        denied = await refused(
            intruder.register("workitems", "127.0.0.1:50099"),
            grpc.StatusCode.PERMISSION_DENIED,
            OWNED,
        )
        reveals_nothing(denied, TOKEN_A)
        assert denied.metadata == {"provider_id": "workitems"}
        # Even holding the owner's lease id (leaked, guessed) is not enough.
        await refused(intruder.renew("workitems", lease), grpc.StatusCode.PERMISSION_DENIED, OWNED)
        await refused(
            intruder.deregister("workitems", lease), grpc.StatusCode.PERMISSION_DENIED, OWNED
        )
    assert await owner.endpoints() == {"workitems": "127.0.0.1:50061"}

    # The owner carries on undisturbed: renew, move, deregister.
    await owner.renew("workitems", lease)
    moved = await owner.register("workitems", "127.0.0.1:50062")
    assert await owner.endpoints() == {"workitems": "127.0.0.1:50062"}
    await owner.deregister("workitems", moved)
    assert await owner.endpoints() == {}
    # Other ids are still free for the other credential.
    await other.register("records", "127.0.0.1:50063")
    assert await other.endpoints() == {"records": "127.0.0.1:50063"}


async def test_ownership_survives_deregistration_lease_expiry_and_a_registry_restart(
    registries: Registries,
) -> None:
    running = await registries.start(lease_ttl_s=0.3)
    owner, other = registries.caller(running, TOKEN_A), registries.caller(running, TOKEN_B)

    await owner.deregister("workitems", await owner.register("workitems"))
    await refused(other.register("workitems"), grpc.StatusCode.PERMISSION_DENIED, OWNED)

    await owner.register("workitems")

    async def lapsed() -> bool:
        return "workitems" not in await owner.endpoints()

    # Waiting for the owner to crash (its lease to lapse) is no way in either.
    await eventually(lapsed, "the owner's lease lapses")
    await refused(other.register("workitems"), grpc.StatusCode.PERMISSION_DENIED, OWNED)

    await registries.stop(running)
    restarted = await registries.start(lease_ttl_s=0.3)
    other = registries.caller(restarted, TOKEN_B)
    await refused(other.register("workitems"), grpc.StatusCode.PERMISSION_DENIED, OWNED)
    owner = registries.caller(restarted, TOKEN_A)
    await owner.register("workitems", "127.0.0.1:50070")
    assert await owner.endpoints() == {"workitems": "127.0.0.1:50070"}


async def test_a_refused_registration_binds_nothing(registries: Registries) -> None:
    running = await registries.start()
    first, second = registries.caller(running, TOKEN_A), registries.caller(running, TOKEN_B)
    await first.register("holder")
    # Refused for its action id (held by "holder"): "rival" must stay unbound.
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await first.stub.RegisterProvider(
            registration("rival", action_id="holder.act"), metadata=first.metadata
        )
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Refused for its endpoint: "elsewhere" stays unbound too.
    await refused(
        first.register("elsewhere", "10.1.2.3:50061"),
        grpc.StatusCode.PERMISSION_DENIED,
        "ENDPOINT_NOT_ALLOWED",
    )
    await second.register("rival")
    await second.register("elsewhere")
    assert set(await second.endpoints()) == {"holder", "rival", "elsewhere"}


# --- credentials required, anonymous shared ---------------------------------------------


async def test_anonymous_calls_are_refused_when_a_credential_is_required(
    registries: Registries,
) -> None:
    running = await registries.start(require_registration_credential=True)
    owner = registries.caller(running, TOKEN_A)
    lease = await owner.register("workitems")
    anonymous = registries.caller(running)

    for call in (
        anonymous.register("workitems"),
        anonymous.register("newcomer"),
        anonymous.renew("workitems", lease),
        anonymous.deregister("workitems", lease),
    ):
        denied = await refused(
            call, grpc.StatusCode.UNAUTHENTICATED, "REGISTRATION_CREDENTIAL_REQUIRED"
        )
        assert "client certificate" in denied.message and "Bearer" in denied.message

    # A credential that is there but unusable is refused as such, never echoed.
    malformed = Caller(anonymous.stub)
    malformed.metadata = (("authorization", "Basic dXNlcjpwYXNz"),)
    await refused(
        malformed.register("newcomer"),
        grpc.StatusCode.UNAUTHENTICATED,
        "REGISTRATION_CREDENTIAL_INVALID",
    )
    short = registries.caller(running, "short-token")
    too_short = await refused(
        short.register("newcomer"),
        grpc.StatusCode.UNAUTHENTICATED,
        "REGISTRATION_CREDENTIAL_INVALID",
    )
    assert "short-token" not in too_short.message
    # Reading the directory needs no credential: gateways watch it.
    assert await anonymous.endpoints() == {"workitems": "127.0.0.1:50061"}


async def test_without_the_requirement_anonymous_is_one_shared_identity(
    registries: Registries,
) -> None:
    running = await registries.start()
    first, second = registries.caller(running), registries.caller(running)
    await first.register("legacy", "127.0.0.1:50061")
    # Documented weakness: any anonymous caller may take over an anonymous id...
    await second.register("legacy", "127.0.0.1:50062")
    assert await first.endpoints() == {"legacy": "127.0.0.1:50062"}
    # ...but a credential cannot take it, and an anonymous caller cannot take a token's.
    tokened = registries.caller(running, TOKEN_A)
    await refused(tokened.register("legacy"), grpc.StatusCode.PERMISSION_DENIED, OWNED)
    await tokened.register("guarded")
    await refused(second.register("guarded"), grpc.StatusCode.PERMISSION_DENIED, OWNED)


# --- the operator releases a binding ------------------------------------------------------


async def test_release_owner_frees_the_id_for_the_next_credential(
    registries: Registries,
) -> None:
    running = await registries.start()
    owner, successor = registries.caller(running, TOKEN_A), registries.caller(running, TOKEN_B)
    await owner.register("workitems")
    await refused(successor.register("workitems"), grpc.StatusCode.PERMISSION_DENIED, OWNED)

    listed = admin("owners", "--json", "--database-url", registries.database_url)
    assert listed.returncode == 0, listed.stderr
    owners = json.loads(listed.stdout)
    token_a_identity = "token:" + hashlib.sha256(TOKEN_A.encode()).hexdigest()
    assert [(o["provider_id"], o["owner"]) for o in owners] == [("workitems", token_a_identity)]
    assert TOKEN_A not in listed.stdout

    # While the registry runs: it reads the binding per call, so no restart is needed.
    released = admin("release-owner", "workitems", "--database-url", registries.database_url)
    assert released.returncode == 0, released.stderr
    assert "released provider 'workitems'" in released.stdout
    assert "WARNING actionmesh.registry_cli" in released.stderr and "released" in released.stderr

    lease = await successor.register("workitems", "127.0.0.1:50071")
    assert await successor.endpoints() == {"workitems": "127.0.0.1:50071"}
    # Now the previous owner is the outsider.
    await refused(owner.register("workitems"), grpc.StatusCode.PERMISSION_DENIED, OWNED)
    await refused(owner.deregister("workitems", lease), grpc.StatusCode.PERMISSION_DENIED, OWNED)

    # Releasing an unbound id says so; the URL can come from the registry's variable.
    again = admin(
        "release-owner",
        "nobody",
        "--json",
        env={f"{ENV_PREFIX}_DATABASE_URL": registries.database_url},
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "provider_id": "nobody",
        "released": False,
        "previous": None,
    }


def test_release_owner_reports_a_missing_database_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "registry.db"
    finished = admin("release-owner", "workitems", "--database-url", sqlite_url(missing))
    assert finished.returncode == 1
    assert finished.stderr.strip() == f"error: no registry database at {missing}"
    assert not missing.parent.exists()


# --- the endpoint allow-list --------------------------------------------------------------


async def test_the_default_allow_list_accepts_loopback_only(registries: Registries) -> None:
    running = await registries.start()
    caller = registries.caller(running, TOKEN_A)
    for index, endpoint in enumerate(("127.0.0.1:50061", "127.5.6.7:1", "[::1]:50061")):
        await caller.register(f"local-{index}", endpoint)
    await caller.register("local-name", "LocalHost:50061")
    for endpoint in ("10.0.0.5:50061", "169.254.169.254:80", "workitems:50061", "[fd00::1]:1"):
        denied = await refused(
            caller.register("remote", endpoint),
            grpc.StatusCode.PERMISSION_DENIED,
            "ENDPOINT_NOT_ALLOWED",
        )
        assert denied.violations == (
            FieldViolation(
                "endpoint", "not an endpoint the operator allows (registry allowed_endpoints)"
            ),
        )
    assert "remote" not in await caller.endpoints()
    # A malformed endpoint is still bad input first, not a permission question.
    await refused(
        caller.register("remote", "no-port"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REGISTRATION",
    )


async def test_an_operator_allow_list_from_the_environment(
    registries: Registries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        f"{ENV_PREFIX}_ALLOWED_ENDPOINTS",
        "workitems:50061, 10.0.0.0/8:50000-50100, *.svc.cluster.local:*",
    )
    config = load_config(RegistryConfig, env_prefix=ENV_PREFIX, argv=["--port", "0"])
    assert config.allowed_endpoints == (
        "workitems:50061",
        "10.0.0.0/8:50000-50100",
        "*.svc.cluster.local:*",
    )
    running = await registries.start(allowed_endpoints=config.allowed_endpoints)
    caller = registries.caller(running, TOKEN_A)
    accepted = {
        "one": "workitems:50061",
        "two": "10.20.30.40:50100",
        "three": "records.actionmesh.svc.cluster.local:443",
    }
    for provider_id, endpoint in accepted.items():
        await caller.register(provider_id, endpoint)
    for endpoint in (
        "workitems:50062",
        "10.20.30.40:50101",
        "127.0.0.1:50061",  # loopback is not implied once the operator sets a list
        "svc.cluster.local.evil.test:443",
        "evil.test:50061",
    ):
        await refused(
            caller.register("four", endpoint),
            grpc.StatusCode.PERMISSION_DENIED,
            "ENDPOINT_NOT_ALLOWED",
        )
    assert await caller.endpoints() == accepted


@pytest.mark.parametrize(
    ("pattern", "endpoint", "allowed"),
    [
        ("127.0.0.0/8", "127.255.0.1:9", True),
        ("127.0.0.0/8", "128.0.0.1:9", False),
        ("127.0.0.0/8", "[::ffff:127.0.0.1]:9", True),  # the IPv4 address it reaches
        ("::1", "[::1]:50061", True),
        ("[::1]:50061", "[::1]:50062", False),
        ("[fd00::/8]:*", "[fd12::3]:1", True),
        ("10.0.0.0/8", "ten.example:9", False),  # names are never resolved
        ("localhost", "localhost:1", True),
        ("*.example.com", "a.b.example.com:1", True),
        ("*.example.com", "example.com:1", False),
        ("*.example.com", "10.0.0.1:1", False),  # a glob never matches an IP literal
        ("db?:5432", "db1:5432", True),
        ("db?:5432", "db1:5433", False),
        ("*", "anything.at.all:1", True),
    ],
)
def test_endpoint_patterns(pattern: str, endpoint: str, allowed: bool) -> None:
    assert EndpointAllowList([pattern]).allows(endpoint) is allowed


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "empty"),
        ("10.0.0.0/33", "host must be"),
        ("host:0", "ports run from 1"),
        ("host:9-1", "ports run from 1"),
        ("host:http", "port must be"),
        ("fd00::1:50061", "not an IPv6 address"),
        ("[10.0.0.1]:1", "brackets hold an IPv6"),
        ("[::1", "missing ']'"),
        ("bad_host", "host must be"),
    ],
)
def test_bad_patterns_are_refused_at_start(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError, match=r"endpoint pattern|empty") as caught:
        EndpointPattern.parse(pattern)
    assert problem in str(caught.value)


def test_the_registry_binary_refuses_a_bad_allow_list_in_one_line(tmp_path: Path) -> None:
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "actionmesh.registry",
            "--port",
            "0",
            "--database-url",
            sqlite_url(tmp_path / "registry.db"),
            "--allowed-endpoints",
            "127.0.0.0/8,host:99999",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert finished.returncode == 2
    assert "allowed_endpoints: endpoint pattern 'host:99999'" in finished.stderr
    assert "Traceback" not in finished.stderr


# --- the provider SDK --------------------------------------------------------------------


def tiny_provider(provider_id: str) -> Provider:
    provider = Provider(provider_id, version="1.0.0")

    @provider.action(f"{provider_id}.act", label="Act", record_types=["workitem"])
    async def act(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    return provider


async def test_a_registry_link_with_a_token_keeps_its_id_from_another(
    registries: Registries,
) -> None:
    running = await registries.start(require_registration_credential=True)
    descriptor = registration("linked").actions

    def link(token: str, endpoint: str) -> RegistryLink:
        return RegistryLink(
            target=running.address,
            provider_id="linked",
            version="1.0.0",
            endpoint=endpoint,
            actions=descriptor,
            max_backoff_s=0.2,
            token=token,
        )

    first, impostor = link(TOKEN_A, "127.0.0.1:50081"), link(TOKEN_B, "127.0.0.1:50082")
    first.start()
    try:
        await asyncio.wait_for(first.registered.wait(), WAIT_S)
        impostor.start()
        # It keeps trying (backing off) and never gets a lease, nor moves the endpoint.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(impostor.registered.wait(), 1.0)
        caller = registries.caller(running)
        assert await caller.endpoints() == {"linked": "127.0.0.1:50081"}
        await first.stop()
        assert await caller.endpoints() == {}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(impostor.registered.wait(), 1.0)
    finally:
        await impostor.stop()
        await first.stop()


async def test_start_provider_sends_the_token_from_its_file(
    registries: Registries, tmp_path: Path
) -> None:
    running = await registries.start(require_registration_credential=True)
    token_file = tmp_path / "registration-token"
    token_file.write_text(f"  {TOKEN_A}\n")
    provider = tiny_provider("filed")
    server = await start_provider(
        provider,
        ProviderConfig(
            registry=running.address,
            data_dir=str(tmp_path),
            registration_token_file=str(token_file),
            registry_retry_max_s=0.2,
        ),
    )
    try:
        assert provider.registration is not None
        await asyncio.wait_for(provider.registration.registered.wait(), WAIT_S)
        # Bound to the file's token (whitespace stripped): another token is refused.
        await refused(
            registries.caller(running, TOKEN_B).register("filed"),
            grpc.StatusCode.PERMISSION_DENIED,
            OWNED,
        )
        await registries.caller(running, TOKEN_A).renew("filed", provider.registration.lease_id)
    finally:
        await server.stop(1.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"registration_token": "short"}, "at least 16 characters"),
        (
            {"registration_token": TOKEN_A, "registration_token_file": "/nonexistent"},
            "not both",
        ),
        ({"registration_token_file": "/nonexistent/token"}, "registration_token_file"),
    ],
)
def test_provider_token_settings_are_checked_at_start(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ProviderConfig(**settings)  # type: ignore[arg-type]


# --- ownership by client certificate (mutual TLS) -----------------------------------------


def tls_of(pki_dir: Path, name: str) -> TlsConfig:
    pki = create_dev_pki(pki_dir, ["registry", "alpha", "beta"])
    cert, key = pki.files(name)
    return TlsConfig(str(cert), str(key), str(pki.ca_file))


def reissue(pki_dir: Path, name: str) -> tuple[bytes, bytes]:
    """Drop ``name``'s certificate and key and issue new ones; the old and new PEM."""
    tls = tls_of(pki_dir, name)
    cert, key = Path(tls.cert_file), Path(tls.key_file)
    old = cert.read_bytes()
    cert.unlink()
    key.unlink()
    tls_of(pki_dir, name)
    return old, cert.read_bytes()


async def test_workloads_with_certificates_from_one_ca_cannot_take_each_others_ids(
    registries: Registries, tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    server_tls = tls_of(pki_dir, "registry")
    running = await registries.start(
        require_registration_credential=True,
        tls_cert_file=server_tls.cert_file,
        tls_key_file=server_tls.key_file,
        tls_ca_file=server_tls.ca_file,
    )
    alpha = registries.caller(running, tls=tls_of(pki_dir, "alpha"))
    # A token next to the certificate changes nothing: the certificate is the identity.
    beta = registries.caller(running, TOKEN_B, tls=tls_of(pki_dir, "beta"))

    lease = await alpha.register("first-svc", "127.0.0.1:50091")
    await beta.register("second-svc", "127.0.0.1:50092")
    for call in (
        beta.register("first-svc", "127.0.0.1:50093"),
        beta.renew("first-svc", lease),
        beta.deregister("first-svc", lease),
    ):
        reveals_nothing(
            await refused(call, grpc.StatusCode.PERMISSION_DENIED, OWNED),
            "actionmesh://alpha",
            TOKEN_B,
        )
    await refused(alpha.register("second-svc"), grpc.StatusCode.PERMISSION_DENIED, OWNED)

    listed = admin("owners", "--json", "--database-url", registries.database_url)
    assert {o["provider_id"]: o["owner"] for o in json.loads(listed.stdout)} == {
        "first-svc": "cert:actionmesh://alpha",
        "second-svc": "cert:actionmesh://beta",
    }

    # Alpha's certificate is reissued (new key, same workload name): it keeps its id.
    old, new = await asyncio.to_thread(reissue, pki_dir, "alpha")
    assert old != new
    renewed = registries.caller(running, tls=tls_of(pki_dir, "alpha"))
    await renewed.renew("first-svc", lease)
    await renewed.register("first-svc", "127.0.0.1:50094")
    assert (await renewed.endpoints())["first-svc"] == "127.0.0.1:50094"


# --- the local mesh ---------------------------------------------------------------------------


def test_the_local_mesh_gives_each_provider_a_private_token(tmp_path: Path) -> None:
    mesh = Mesh(MeshSettings(data_dir=tmp_path / "mesh"))
    first = mesh.registration_token_file("workitems")
    again = mesh.registration_token_file("workitems")
    other = mesh.registration_token_file("records")
    assert first == again and first.read_text() == again.read_text()
    assert len(first.read_text()) >= 32 and first.read_text() != other.read_text()
    assert first.stat().st_mode & 0o777 == 0o600
    assert first.parent.stat().st_mode & 0o777 == 0o700
