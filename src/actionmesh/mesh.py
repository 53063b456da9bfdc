"""Runs the whole mesh as local processes: what ``actionmesh up`` and the tests use.

Each service is a real child process (``python -m actionmesh.registry``, ...) on loopback
with its state under one data directory. A child announces its bound port in a
ready file; the supervisor then waits for grpc.health.v1 SERVING before starting
the services that depend on it (registry and audit log, then the gateway, then
providers). Port 0 gives every service a free port, which is how tests run it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.devpki import DevPki, create_dev_pki
from actionmesh.gateway.config import DEFAULT_POLICY_FILE
from actionmesh.providers.supportdesk.server import is_healthy
from actionmesh.rpc.tls import TlsConfig
from actionmesh.runtime.db import sqlite_url

SIGNING_KEY_FILE = "dev-signing-key"
REDACTION_KEY_FILE = "redaction-key"
POLICY_FILE = "policies.cedar"
STATE_FILE = "mesh.json"
NOTIFICATIONS_FILE = "notifications.json"
NOTIFICATION_SECRET_FILE = "webhook-secret"
RECEIVER_EVENTS_FILE = "webhook-events.jsonl"
# The demo tenant's subscription that `actionmesh up` points at the local receiver.
DEMO_TENANT = "acme"
DEMO_SUBSCRIPTION = "local-receiver"
REGISTRATION_TOKENS_DIR = "registration-tokens"
TLS_DIR = "tls"
# The certificate the supervisor's health probes, the CLI and tests present.
CLIENT_CERT_NAME = "client"
DEFAULT_PROVIDERS = (
    "actionmesh.providers.workitems",
    "actionmesh.providers.records",
    "actionmesh.providers.escalation",
)
ESCALATION_PROVIDER = "actionmesh.providers.escalation"
# The escalation provider's downstream: a stand-in external platform (HTTP), not a provider.
PLATFORM_URL_ENV = "ACTIONMESH_ESCALATION_PLATFORM_URL"
# Each service's SQLite file under DATA_DIR/data (also what `actionmesh db` upgrades).
DATABASE_FILES = {"gateway": "gateway.db", "auditlog": "audit.db", "registry": "registry.db"}


def mesh_database_url(data_dir: Path, service: str) -> str:
    """Where the mesh under ``data_dir`` keeps ``service``'s database."""
    return sqlite_url(data_dir / "data" / DATABASE_FILES[service])


class MeshError(RuntimeError):
    """A service failed to start or become healthy."""


@dataclass(frozen=True)
class MeshSettings:
    """How to lay out and run a local mesh."""

    data_dir: Path = Path(".actionmesh")
    """Where every service keeps its state, logs and ready files."""
    registry_port: int = 50051
    """Registry port (0 = any free port)."""
    auditlog_port: int = 50052
    """Audit log port (0 = any free port)."""
    gateway_port: int = 50050
    """Gateway port (0 = any free port)."""
    supportdesk_port: int = 8780
    """Port of the stand-in external support platform (HTTP; 0 = any free port).
    Started only when the escalation provider runs and extra_env names no platform."""
    webhook_receiver_port: int = 8790
    """Port of the local webhook receiver (HTTP; 0 = any free port), subscribed to every
    notification of the demo tenant; see ``notifications``."""
    notifications: bool = True
    """Start the local webhook receiver and give the gateway a notifications file with
    one subscription (tenant acme, every event type) pointing at it."""
    provider_modules: tuple[str, ...] = DEFAULT_PROVIDERS
    """Provider modules to run, each as ``python -m MODULE``, on free ports."""
    seed_demo: bool = True
    """Seed the example providers with demo records."""
    lease_ttl_s: float = 10.0
    """Provider lease in the registry."""
    health_check_interval_s: float = 2.0
    """How often the registry health-checks providers."""
    start_timeout_s: float = 30.0
    """How long one service may take to become healthy."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """Environment added to every child (e.g. log level, trace exporter)."""
    tls: bool = False
    """Mutual TLS between every gRPC service, with a development CA and one certificate
    per service under DATA_DIR/tls (made on first use, reused while valid)."""


@dataclass
class Service:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    log_path: Path | None = None
    url: str = ""
    metrics_url: str = ""
    # How it was launched, so restart_service can launch it again the same way.
    base_command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    http: bool = False


class Mesh:
    """Supervises the mesh's processes; use as a context manager or start()/stop()."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.services: dict[str, Service] = {}
        self.pki: DevPki | None = None

    # -- layout -------------------------------------------------------------
    @property
    def signing_key_path(self) -> Path:
        return self.data_dir / SIGNING_KEY_FILE

    @property
    def redaction_key_path(self) -> Path:
        return self.data_dir / REDACTION_KEY_FILE

    @property
    def policy_path(self) -> Path:
        return self.data_dir / POLICY_FILE

    @property
    def notifications_path(self) -> Path:
        return self.data_dir / NOTIFICATIONS_FILE

    @property
    def notification_secret_path(self) -> Path:
        return self.data_dir / NOTIFICATION_SECRET_FILE

    @property
    def receiver_events_path(self) -> Path:
        """Where the local webhook receiver appends the notifications it verified."""
        return self.data_dir / "data" / RECEIVER_EVENTS_FILE

    def signing_key(self) -> str:
        return self.signing_key_path.read_text().strip()

    def address(self, name: str) -> str:
        return self.services[name].address

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / TLS_DIR

    def tls_for(self, name: str) -> TlsConfig | None:
        """The TLS files of workload ``name`` (issued on first use), or None without TLS."""
        if not self.settings.tls:
            return None
        cert_name = name.lower().replace("_", "-")
        if self.pki is None or cert_name not in self.pki.names:
            # Idempotent: reuses the CA and every certificate already on disk.
            self.pki = create_dev_pki(
                self.tls_dir, [*(self.pki.names if self.pki else ()), cert_name]
            )
        cert_file, key_file = self.pki.files(cert_name)
        return TlsConfig(str(cert_file), str(key_file), str(self.pki.ca_file))

    @property
    def client_tls(self) -> TlsConfig | None:
        """What a client of this mesh (CLI, tests, health probes) presents, or None."""
        return self.tls_for(CLIENT_CERT_NAME)

    def prepare(self) -> None:
        for sub in ("run", "logs", "data"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        for key_path in (
            self.signing_key_path,
            self.redaction_key_path,
            self.notification_secret_path,
        ):
            if not key_path.exists():
                key_path.write_text(secrets.token_hex(32))
                key_path.chmod(0o600)
        if not self.policy_path.exists():
            shutil.copyfile(DEFAULT_POLICY_FILE, self.policy_path)
        if self.settings.tls:
            names = [
                "registry",
                "auditlog",
                "gateway",
                CLIENT_CERT_NAME,
                *(m.rsplit(".", 1)[-1] for m in self.settings.provider_modules),
            ]
            self.pki = create_dev_pki(self.tls_dir, [n.lower().replace("_", "-") for n in names])

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self.prepare()
        try:
            self._launch("registry", self._registry_command(), self.settings.registry_port)
            self._launch("auditlog", self._auditlog_command(), self.settings.auditlog_port)
            gateway_flags: list[str] = []
            if self.settings.notifications:
                self._launch(
                    "webhook-receiver",
                    [
                        sys.executable,
                        "-m",
                        "actionmesh.webhook_receiver",
                        "--secret-file",
                        str(self.notification_secret_path),
                        "--events-file",
                        str(self.receiver_events_path),
                    ],
                    self.settings.webhook_receiver_port,
                    http=True,
                )
                self._write_notifications(self.services["webhook-receiver"].url)
                gateway_flags = ["--notifications-file", str(self.notifications_path)]
            self._launch(
                "gateway",
                [*self._gateway_command(), *gateway_flags],
                self.settings.gateway_port,
            )
            if self._needs_platform():
                self._launch(
                    "supportdesk",
                    [
                        sys.executable,
                        "-m",
                        "actionmesh.providers.supportdesk",
                        "--data-dir",
                        str(self.data_dir / "data" / "supportdesk"),
                    ],
                    self.settings.supportdesk_port,
                    http=True,
                )
            for module in self.settings.provider_modules:
                self.start_provider(module)
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def start_provider(
        self, module: str, *, name: str = "", env: dict[str, str] | None = None
    ) -> Service:
        """Run ``python -m module`` as a provider; ``name`` and ``env`` allow several
        processes of one module (tests run one module as two providers)."""
        name = name or module.rsplit(".", 1)[-1]
        command = [
            sys.executable,
            "-m",
            module,
            "--registry",
            self.address("registry"),
            "--data-dir",
            str(self.data_dir / "data" / "providers"),
            "--seed-demo",
            "true" if self.settings.seed_demo else "false",
            # Its own token: the registry binds the provider id to it, so another local
            # process cannot take the id over or deregister it.
            "--registration-token-file",
            str(self.registration_token_file(name)),
        ]
        env = dict(env or {})
        if module == ESCALATION_PROVIDER and "supportdesk" in self.services:
            env[PLATFORM_URL_ENV] = self.services["supportdesk"].url
        return self._launch(name, command, 0, env=env)

    def registration_token_file(self, name: str) -> Path:
        """The registration token of provider ``name``: made once, kept with the data,
        because the registry's database remembers which token owns the id."""
        directory = self.data_dir / REGISTRATION_TOKENS_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / f"{name}.token"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32))
        return path

    def _needs_platform(self) -> bool:
        return (
            ESCALATION_PROVIDER in self.settings.provider_modules
            and PLATFORM_URL_ENV not in self.settings.extra_env
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM in reverse start order (providers deregister first), then SIGKILL."""
        for service in reversed(list(self.services.values())):
            self.stop_service(service.name, grace_s=grace_s)

    def stop_service(self, name: str, *, grace_s: float = 10.0, kill: bool = False) -> None:
        service = self.services.get(name)
        if service is None or service.process is None or service.process.poll() is not None:
            return
        service.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            service.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait(timeout=5)

    def restart_service(self, name: str) -> Service:
        """Start a stopped or killed service again: same command, same data, same port."""
        old = self.services[name]
        if old.process is not None and old.process.poll() is None:
            raise MeshError(f"{name} is still running; stop it first")
        port = int(old.address.rsplit(":", 1)[1])
        return self._launch(name, old.base_command, port, env=old.env, http=old.http)

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def signal_service(self, name: str, sig: signal.Signals) -> None:
        """Send one signal to a running service (SIGSTOP/SIGCONT to make it hang, fault tests)."""
        service = self.services[name]
        if service.process is None or service.process.poll() is not None:
            raise MeshError(f"{name} is not running")
        service.process.send_signal(sig)

    def dead_services(self) -> list[str]:
        return [
            s.name for s in self.services.values() if s.process and s.process.poll() is not None
        ]

    # -- internals ----------------------------------------------------------
    def _write_notifications(self, receiver_url: str) -> None:
        """The demo subscription: tenant acme, every notification, to the local receiver.
        Rewritten at each start (the receiver's port may change); edit a copy to add
        your own and pass it with ACTIONMESH_GATEWAY_NOTIFICATIONS_FILE."""
        document = {
            "subscriptions": [
                {
                    "id": DEMO_SUBSCRIPTION,
                    "tenant": DEMO_TENANT,
                    "url": receiver_url.rstrip("/") + "/hooks/actionmesh",
                    "events": ["*"],
                    "secret_file": str(self.notification_secret_path),
                }
            ]
        }
        self.notifications_path.write_text(json.dumps(document, indent=2) + "\n")

    def _registry_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "actionmesh.registry",
            "--database-url",
            mesh_database_url(self.data_dir, "registry"),
            "--lease-ttl-s",
            str(self.settings.lease_ttl_s),
            "--health-check-interval-s",
            str(self.settings.health_check_interval_s),
        ]

    def _auditlog_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "actionmesh.auditlog",
            "--database-url",
            mesh_database_url(self.data_dir, "auditlog"),
        ]

    def start_gateway(self, name: str, *flags: str, database_url: str = "") -> Service:
        """Another gateway process on the same registry and audit log (replicas, tests).

        ``flags`` are extra gateway flags (e.g. ``--approval-ttl-s 1``); by default
        it gets a database of its own.
        """
        url = database_url or sqlite_url(self.data_dir / "data" / f"{name}.db")
        return self._launch(name, [*self._gateway_command(url), *flags], 0)

    def _gateway_command(self, database_url: str = "") -> list[str]:
        return [
            sys.executable,
            "-m",
            "actionmesh.gateway",
            "--registry",
            self.address("registry"),
            "--auditlog",
            self.address("auditlog"),
            "--database-url",
            database_url or mesh_database_url(self.data_dir, "gateway"),
            "--policy-file",
            str(self.policy_path),
            # A generated HS256 key: development mode, which `actionmesh up` is.
            "--jwt-dev-mode",
            "true",
            "--jwt-secret-file",
            str(self.signing_key_path),
            "--redaction-key-file",
            str(self.redaction_key_path),
        ]

    def _launch(
        self,
        name: str,
        command: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        http: bool = False,
    ) -> Service:
        """Start one child; ``http`` services are probed on /healthz instead of grpc health."""
        ready_file = self.data_dir / "run" / f"{name}.json"
        ready_file.unlink(missing_ok=True)
        log_path = self.data_dir / "logs" / f"{name}.log"
        full = [
            *command,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ready-file",
            str(ready_file),
        ]
        tls = None if http else self.tls_for(name)
        if tls is not None:
            full += [
                "--tls-cert-file",
                tls.cert_file,
                "--tls-key-file",
                tls.key_file,
                "--tls-ca-file",
                tls.ca_file,
            ]
        child_env = {
            **os.environ,
            **(env or {}),
            **self.settings.extra_env,
            "PYTHONUNBUFFERED": "1",
        }
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                full, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
            )
        service = Service(
            name=name,
            command=full,
            process=process,
            log_path=log_path,
            base_command=command,
            env=dict(env or {}),
            http=http,
        )
        self.services[name] = service
        self._wait_ready(service, ready_file, http=http)
        return service

    def _wait_ready(self, service: Service, ready_file: Path, *, http: bool = False) -> None:
        assert service.process is not None
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise MeshError(
                    f"{service.name} exited with {service.process.returncode}; "
                    f"last log lines:\n{tail(service.log_path)}"
                )
            if not service.address and ready_file.exists():
                ready = json.loads(ready_file.read_text())
                service.address, service.url = ready["address"], ready.get("url", "")
                service.metrics_url = ready.get("metrics_url", "")
            if service.address and (
                is_healthy(service.url)
                if http
                else is_serving(service.address, tls=self.client_tls)
            ):
                return
            time.sleep(0.05)
        raise MeshError(
            f"{service.name} was not healthy within {self.settings.start_timeout_s}s; "
            f"last log lines:\n{tail(service.log_path)}"
        )

    def _write_state(self) -> None:
        state = {
            "gateway": self.address("gateway"),
            "registry": self.address("registry"),
            "auditlog": self.address("auditlog"),
            "providers": {
                s.name: s.address
                for s in self.services.values()
                if s.name
                not in ("gateway", "registry", "auditlog", "supportdesk", "webhook-receiver")
                and not s.name.startswith("gateway")
            },
            "supportdesk": self.services["supportdesk"].url
            if "supportdesk" in self.services
            else "",
            "webhook_receiver": self.services["webhook-receiver"].url
            if "webhook-receiver" in self.services
            else "",
            "notifications_file": str(self.notifications_path)
            if "webhook-receiver" in self.services
            else "",
            "metrics": {s.name: s.metrics_url for s in self.services.values() if s.metrics_url},
            "signing_key_file": str(self.signing_key_path),
            "policy_file": str(self.policy_path),
        }
        client_tls = self.client_tls
        if client_tls is not None:
            # The CLI reads these, so `actionmesh run ...` works against `up --tls` as is.
            state["tls"] = {
                "ca_file": client_tls.ca_file,
                "cert_file": client_tls.cert_file,
                "key_file": client_tls.key_file,
            }
        (self.data_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def is_serving(address: str, timeout_s: float = 0.5, *, tls: TlsConfig | None = None) -> bool:
    """Whether the gRPC server at ``address`` answers SERVING (over TLS with ``tls``)."""
    channel = (
        grpc.secure_channel(address, tls.channel_credentials())
        if tls is not None and tls.enabled
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
