"""The mesh as real containers: images from deploy/docker/Dockerfile, each container
configured by its service in docker-compose.yml.

Engines on the development machines have no bridge network, so the containers use
the host's network and listen on 127.0.0.1 only, on ports the test picks. Compose's
service addresses (``registry:50051``, ``postgres:5432``, ``otel-collector:4317``...)
are rewritten to those loopback addresses; everything else a compose service says
(environment, read-only root, tmpfs, dropped capabilities, secrets, volumes, command)
is applied as written, so these tests also check that the compose file's settings
work.

Without a Docker engine the tests skip with the reason; with
ACTIONMESH_REQUIRE_DOCKER=1 (CI) that is a failure instead.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import docker
import docker.errors
import pytest
import yaml
from docker.models.containers import Container
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.image import DockerImage

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = "deploy/docker/Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
REQUIRE_ENV = "ACTIONMESH_REQUIRE_DOCKER"
LABEL = "dev.actionmesh.test-run"
IMAGE_TAG = "test"

# No registry is reachable here, so Ryuk (testcontainers' reaper image) cannot be
# pulled; the fixtures remove what they start themselves.
testcontainers_config.ryuk_disabled = True


def engine_problem() -> str | None:
    """Why no container can run here, or None when a Docker engine answers."""
    try:
        client = docker.from_env(timeout=15)
        client.ping()
        client.close()
    except Exception as exc:  # docker-py raises several unrelated types for "no engine"
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    return None


def unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"Docker is required ({REQUIRE_ENV}=1) but unavailable: {reason}")
    pytest.skip(
        f"{reason}; on the development machines ../shared/containers/local-python-image starts one"
    )


def require_engine() -> None:
    problem = engine_problem()
    if problem is not None:
        unavailable(problem)


def build_images(targets: tuple[str, ...]) -> dict[str, str]:
    """Build each Dockerfile target as ``actionmesh/<target>:test``; target -> tag.

    The layers stay in the engine's cache, so a second run only rebuilds what changed.
    """
    tags = {}
    for target in targets:
        tag = f"actionmesh/{target}:{IMAGE_TAG}"
        image = DockerImage(
            path=REPO,
            tag=tag,
            dockerfile_path=DOCKERFILE,
            clean_up=False,
            target=target,
            network_mode="host",
        )
        try:
            image.build()
        except docker.errors.BuildError as exc:
            log = "".join(str(line.get("stream", line)) for line in exc.build_log)
            pytest.fail(f"image {tag} did not build: {exc}\n{log[-4000:]}")
        tags[target] = tag
    return tags


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def compose_document() -> dict[str, Any]:
    """docker-compose.yml with anchors and merge keys resolved."""
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@dataclass
class ContainerMesh:
    """Containers of one test run, all removed (with their volumes) by ``remove_all``."""

    images: dict[str, str]
    exact: dict[str, str]
    """Compose values replaced when they equal a key (a database URL, a host name)."""
    substrings: dict[str, str]
    """Compose values rewritten where they contain a key (``registry:50051``)."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    containers: dict[str, DockerContainer] = field(default_factory=dict)
    volumes: set[str] = field(default_factory=set)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.document = compose_document()
        self.compose: dict[str, Any] = self.document["services"]
        self.client = docker.from_env(timeout=60)

    def _rewrite(self, value: str) -> str:
        if value in self.exact:
            return self.exact[value]
        for old, new in self.substrings.items():
            value = value.replace(old, new)
        return value

    def reserve_port(self, name: str) -> int:
        """The loopback port container ``name`` will listen on (picked once)."""
        return self.ports.setdefault(name, free_port())

    def start(
        self,
        service: str,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        port_variable: str | None = None,
        image: str | None = None,
        volumes_of: str | None = None,
    ) -> Container:
        """Start compose ``service`` (as container ``name``) on host networking.

        ``port_variable`` is the setting that carries the listening port; the service
        gets a free loopback port through it (and HOST=127.0.0.1 beside it). ``image``
        runs another image with the service's settings (a team's provider like the
        example ones); ``volumes_of`` names the container whose named volumes this one
        takes over (a replacement), otherwise they are its own.
        """
        name = name or service
        spec = self.compose[service]
        image = image or self.images[spec["build"]["target"]]
        environment = {k: self._rewrite(str(v)) for k, v in spec.get("environment", {}).items()}
        if port_variable is not None:
            port = self.reserve_port(name)
            environment[port_variable] = str(port)
            environment[port_variable.removesuffix("_PORT") + "_HOST"] = "127.0.0.1"
        environment.update(env or {})

        container = DockerContainer(image).with_name(f"actionmesh-test-{self.run_id}-{name}")
        for key, value in environment.items():
            container.with_env(key, value)
        if "command" in spec:
            container.with_command(list(spec["command"]))
        for path in spec.get("tmpfs", []):
            container.with_tmpfs_mount(path)
        for volume in spec.get("volumes", []):
            source, target_path, *mode = volume.split(":")
            if source.startswith("."):
                container.with_volume_mapping(REPO / source, target_path, *mode)
            else:  # a named volume, private to this run
                volume_name = f"actionmesh-test-{self.run_id}-{volumes_of or name}-{source}"
                self.volumes.add(volume_name)
                container.with_volume_mapping(volume_name, target_path, *(mode or ["rw"]))
        top_secrets = self.document.get("secrets", {})
        for secret in spec.get("secrets", []):
            container.with_volume_mapping(
                REPO / top_secrets[secret]["file"], f"/run/secrets/{secret}", "ro"
            )
        container.with_kwargs(
            network_mode="host",
            read_only=bool(spec.get("read_only", False)),
            cap_drop=spec.get("cap_drop"),
            security_opt=spec.get("security_opt"),
            labels={LABEL: self.run_id},
        )
        container.start()
        self.containers[name] = container
        return container.get_wrapped_container()

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def container(self, name: str) -> Container:
        wrapped = self.containers[name].get_wrapped_container()
        wrapped.reload()
        return wrapped

    def logs(self, name: str, lines: int = 40) -> str:
        try:
            output = self.container(name).logs(tail=lines)
        except docker.errors.NotFound:
            return "(container gone)"
        return bytes(output).decode(errors="replace")

    def wait_exit(self, name: str, timeout_s: float) -> int:
        result = self.container(name).wait(timeout=timeout_s)
        return int(result["StatusCode"])

    def remove(self, name: str) -> None:
        container = self.containers.pop(name, None)
        if container is not None:
            try:
                container.get_wrapped_container().remove(force=True)
            except docker.errors.NotFound:
                pass

    def remove_all(self) -> None:
        for name in list(self.containers):
            self.remove(name)
        for volume in self.volumes:
            try:
                self.client.volumes.get(volume).remove(force=True)
            except docker.errors.NotFound:
                pass
        self.client.close()

    def all_logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.logs(name)}" for name in self.containers)


def docker_health(container: Container) -> str:
    """The engine's own verdict from the image's HEALTHCHECK ('healthy', 'starting'...)."""
    container.reload()
    return str(container.attrs["State"].get("Health", {}).get("Status", "none"))


def wait_until(check: Any, timeout_s: float, what: str, logs: Any = None) -> Any:
    """Poll a sync check until truthy (bounded); the failure names what and shows logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout_s:.0f} s)\n{logs() if logs else ''}")
        time.sleep(0.3)
