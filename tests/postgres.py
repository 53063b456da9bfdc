"""A throwaway PostgreSQL for tests: ``postgres_server`` per session, ``postgres_url`` per test.

The server comes from the PostgreSQL binaries when they are installed (initdb and
pg_ctl, run as an unprivileged user when the tests run as root, because postgres
refuses to run as root), else from testcontainers when a Docker engine answers.
It listens on 127.0.0.1 only, on a free port, with trust authentication, its
sockets inside its own data directory, and is stopped and removed at the end.

Without either the tests that use it skip with the reason, unless
ACTIONMESH_REQUIRE_POSTGRES=1 (CI), which turns that into a failure.

Plugged in from tests/conftest.py with ``pytest_plugins = ["tests.postgres"]``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql

REQUIRE_ENV = "ACTIONMESH_REQUIRE_POSTGRES"
UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"
# Where distributions put the server binaries when they are not on PATH.
BINARY_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
START_ATTEMPTS = 3


class PostgresUnavailable(Exception):
    """Neither PostgreSQL binaries nor a Docker engine can give us a server."""


@dataclass
class PostgresServer:
    """A running PostgreSQL that trusts ``postgres`` on 127.0.0.1:``port``."""

    host: str
    port: int
    user: str = SUPERUSER
    password: str = ""
    admin_database: str = "postgres"

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"{driver}://{auth}@{self.host}:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            dbname=self.admin_database,
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self) -> str:
        """A new empty database; its ``postgresql+psycopg://`` URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self._admin() as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[-1]
        with self._admin() as connection:
            # FORCE ends connections a test's engine pool may still hold.
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _find_binaries() -> Path | None:
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).parent] if on_path else []
    for pattern in BINARY_GLOBS:
        candidates += [Path(folder) for folder in sorted(glob.glob(pattern), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _LocalCluster:
    """initdb + pg_ctl in a temp dir, as ``nobody`` when we are root."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="actionmesh-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            # postgres refuses to run as root; hand the whole folder to an unprivileged user.
            account = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.prefix = _as_user(UNPRIVILEGED_USER)
        self.root.chmod(0o700)

    def _run(self, *command: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [*self.prefix, *command], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(command)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        return ""

    def start(self) -> int:
        self._run(
            str(self.binaries / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        # Trust, but only over loopback TCP and the socket inside the data directory.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        last: Exception | None = None
        for _ in range(START_ATTEMPTS):
            port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {self.data} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=300"
            )
            try:
                self._run(
                    str(self.binaries / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "30",
                    "start",
                )
                return port
            except PostgresUnavailable as exc:
                last = exc  # most likely the port was taken between probe and bind
        raise PostgresUnavailable(f"could not start PostgreSQL: {last}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(
                str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
            )
        shutil.rmtree(self.root, ignore_errors=True)


def _as_user(user: str) -> list[str]:
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--"]
    if shutil.which("setpriv"):
        account = pwd.getpwnam(user)
        return [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            "--",
        ]
    raise PostgresUnavailable(f"running as root and neither runuser nor setpriv to become {user}")


def _docker_running() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def _from_binaries(binaries: Path) -> Iterator[PostgresServer]:
    cluster = _LocalCluster(binaries)
    try:
        port = cluster.start()
        yield PostgresServer(host="127.0.0.1", port=port)
    finally:
        cluster.stop()


@contextlib.contextmanager
def _from_container() -> Iterator[PostgresServer]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
        yield PostgresServer(
            host=container.get_container_host_ip(),
            port=int(container.get_exposed_port(5432)),
            user=container.username,
            password=container.password,
            admin_database=container.dbname,
        )


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but unavailable: {reason}")
    pytest.skip(f"no PostgreSQL for these tests: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (binaries first, then testcontainers)."""
    binaries = _find_binaries()
    if binaries is not None:
        source = _from_binaries(binaries)
    elif _docker_running():
        source = _from_container()
    else:
        _unavailable(
            "no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin and no running "
            "Docker engine for testcontainers"
        )
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(source)
        except Exception as exc:  # a failed start is a reason to skip (or fail in CI)
            _unavailable(str(exc))
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test: its ``postgresql+psycopg://`` URL."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)
