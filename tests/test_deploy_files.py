"""The deployment files agree with the code: Dockerfile, docker-compose.yml, Kubernetes.

Parsing and cross-checking only (no Docker engine, no kubectl): every variable a
container sets is a real setting from docs/configuration.md with a value the
service accepts, probes ask the health names the servers really register, ports
line up, images run as non-root, and the policy ConfigMap is the shipped policy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from actionmesh import configdoc
from actionmesh.auditlog.server import SERVICE_NAME as AUDIT_SERVICE
from actionmesh.gateway.config import DEFAULT_POLICY_FILE
from actionmesh.gateway.server import POLICY_HEALTH_NAME
from actionmesh.gateway.server import SERVICE_NAME as GATEWAY_SERVICE
from actionmesh.registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
from actionmesh.rpc.config import load_config
from actionmesh.rpc.telemetry import EXPORTERS
from actionmesh.sdk.runtime import SERVICE_NAME as PROVIDER_SERVICE

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
KUBERNETES = REPO / "deploy" / "kubernetes"
CONFIG_TABLE = REPO / "docs" / "configuration.md"

# What each workload runs: its Dockerfile target, the grpc.health.v1 names its server
# registers ("" is the whole server; start_server sets it and each service's name),
# and the variable prefixes it may be configured with.
ALL_SERVERS = ("",)
WORKLOADS: dict[str, dict[str, Any]] = {
    "registry": {"health": {*ALL_SERVERS, REGISTRY_SERVICE}, "prefixes": ("ACTIONMESH_REGISTRY",)},
    "auditlog": {"health": {*ALL_SERVERS, AUDIT_SERVICE}, "prefixes": ("ACTIONMESH_AUDITLOG",)},
    "gateway": {
        "health": {*ALL_SERVERS, GATEWAY_SERVICE, POLICY_HEALTH_NAME},
        "prefixes": ("ACTIONMESH_GATEWAY",),
    },
    "workitems": {"health": {*ALL_SERVERS, PROVIDER_SERVICE}, "prefixes": ("ACTIONMESH_PROVIDER",)},
    "records": {"health": {*ALL_SERVERS, PROVIDER_SERVICE}, "prefixes": ("ACTIONMESH_PROVIDER",)},
    "escalation": {
        "health": {*ALL_SERVERS, PROVIDER_SERVICE},
        "prefixes": ("ACTIONMESH_PROVIDER", "ACTIONMESH_ESCALATION"),
    },
    "supportdesk": {"health": None, "prefixes": ("ACTIONMESH_SUPPORTDESK",)},
    # The migration job: `actionmesh db upgrade` reads each service's database URL.
    "migrate": {
        "health": None,
        "prefixes": ("ACTIONMESH_GATEWAY", "ACTIONMESH_AUDITLOG", "ACTIONMESH_REGISTRY"),
    },
}
K8S_MIGRATION_JOB = "actionmesh-migrate"
# Images that run a gRPC or HTTP server and so need a HEALTHCHECK.
SERVER_TARGETS = (
    "registry",
    "auditlog",
    "gateway",
    "provider-base",
    "workitems",
    "records",
    "escalation",
    "supportdesk",
)
PROCESS_WIDE = {v.name for v in configdoc.PROCESS_VARIABLES}
SECTION_BY_PREFIX = {s.env_prefix: s for s in configdoc.SECTIONS}


# -- loading -------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """One stage of the multi-stage Dockerfile."""

    name: str
    base: str
    instructions: list[tuple[str, str]]

    def last(self, keyword: str) -> str | None:
        found = [args for kw, args in self.instructions if kw == keyword]
        return found[-1] if found else None


def dockerfile_stages(text: str) -> dict[str, Stage]:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = Stage(match.group(2), match.group(1), [])
            stages[current.name] = current
        else:
            assert current is not None, f"{line!r} before the first FROM"
            current.instructions.append((keyword, " ".join(args.split())))
    return stages


def effective(stages: Mapping[str, Stage], name: str, keyword: str) -> str | None:
    """An instruction's value in a stage, inherited from the stages it builds FROM."""
    stage: Stage | None = stages[name]
    while stage is not None:
        value = stage.last(keyword)
        if value is not None:
            return value
        stage = stages.get(stage.base)
    return None


def stage_env(stages: Mapping[str, Stage], name: str) -> dict[str, str]:
    chain: list[Stage] = []
    stage: Stage | None = stages[name]
    while stage is not None:
        chain.append(stage)
        stage = stages.get(stage.base)
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for keyword, args in stage.instructions:
            if keyword == "ENV":
                env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def kustomization() -> dict[str, Any]:
    loaded = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def documented_names() -> set[str]:
    """The variable names in the first column of docs/configuration.md's tables."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", CONFIG_TABLE.read_text(), re.MULTILINE))


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: (p[1] if len(p) > 1 else None) for p in pairs}
    return {k: None if v is None else str(v) for k, v in env.items()}


def k8s_env(
    container: dict[str, Any], config_maps: Mapping[str, dict[str, Any]]
) -> dict[str, str | None]:
    """A container's variables; None for values from a Secret (not in the files)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"envFrom names a missing ConfigMap {name}"
        env.update({k: str(v) for k, v in config_maps[name]["data"].items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else None
    return env


def all_workload_env(
    compose: dict[str, Any], manifests: list[dict[str, Any]]
) -> Iterator[tuple[str, str, dict[str, str | None]]]:
    """(where, workload name, env) of every compose service and Kubernetes container."""
    for name, service in compose["services"].items():
        yield "docker-compose.yml", name, compose_env(service)
    config_maps = of_kind(manifests, "ConfigMap")
    for kind in ("Deployment", "Job"):
        for name, workload in of_kind(manifests, kind).items():
            for container in pod_spec(workload)["containers"]:
                workload_name = "migrate" if name == K8S_MIGRATION_JOB else name
                yield f"{kind} {name}", workload_name, k8s_env(container, config_maps)


def unknown_env_names(env_names: list[tuple[str, str]], documented: set[str]) -> list[str]:
    """Every ACTIONMESH_* / OTEL_* name that is not in the configuration table."""
    return [
        f"{where}: {name}"
        for where, name in env_names
        if name.startswith(("ACTIONMESH_", "OTEL_")) and name not in documented
    ]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- the configuration table ---------------------------------------------------------
def test_configuration_table_is_generated_from_the_config_classes(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "actionmesh.configdoc", "--check"]
    fresh = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0, f"{fresh.stderr} (run python -m actionmesh.configdoc)"
    stale = tmp_path / "configuration.md"
    stale.write_text(configdoc.render().replace("ACTIONMESH_GATEWAY_PORT", "ACTIONMESH_GW_PORT"))
    rejected = subprocess.run(
        [*command, "--output", str(stale)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert rejected.returncode == 1
    assert "stale" in rejected.stderr


def test_configuration_table_lists_every_setting_with_its_flag() -> None:
    text = CONFIG_TABLE.read_text()
    documented = documented_names()
    for section in configdoc.SECTIONS:
        for field in dataclasses.fields(section.cls):
            variable = f"{section.env_prefix}_{field.name.upper()}"
            assert variable in documented
            if section.flags:
                assert f"| `{variable}` | `--{field.name.replace('_', '-')}` |" in text
    assert {"ACTIONMESH_TRACE_EXPORTER", "ACTIONMESH_LOG_LEVEL"} <= documented
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS"} <= documented
    assert "ACTIONMESH_ESCALATION_PLATFORM_URL" in documented
    # Defaults that are paths inside the package do not depend on where it is installed.
    assert str(REPO) not in text


# -- environment variables of every container ----------------------------------------
def test_every_variable_set_in_compose_and_kubernetes_is_documented(
    compose: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    names = [(where, n) for where, _, env in all_workload_env(compose, manifests) for n in env]
    assert len(names) > 40, "the files set the services' variables"
    assert unknown_env_names(names, documented_names()) == []


def test_a_misspelt_variable_is_caught() -> None:
    documented = documented_names()
    names = [
        ("gateway", "ACTIONMESH_GATEWAY_JWT_SECRET_FILE"),
        ("gateway", "ACTIONMESH_GATEWAY_JWT_SECRET"),
        ("workitems", "ACTIONMESH_PROVIDERS_REGISTRY"),
        ("any", "OTEL_EXPORTER_OTLP_ENDPOIN"),
        ("any", "POSTGRES_DB"),
    ]
    assert unknown_env_names(names, documented) == [
        "gateway: ACTIONMESH_GATEWAY_JWT_SECRET",
        "workitems: ACTIONMESH_PROVIDERS_REGISTRY",
        "any: OTEL_EXPORTER_OTLP_ENDPOIN",
    ]


def test_each_container_only_sets_its_own_services_settings(
    compose: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    for where, workload, env in all_workload_env(compose, manifests):
        if workload not in WORKLOADS:
            assert not [n for n in env if n.startswith("ACTIONMESH_")], where
            continue
        prefixes = WORKLOADS[workload]["prefixes"]
        for name in env:
            if name.startswith("ACTIONMESH_") and name not in PROCESS_WIDE:
                assert name.startswith(tuple(p + "_" for p in prefixes)), f"{where}: {name}"


def test_each_containers_settings_are_accepted_by_its_service(
    compose: dict[str, Any], manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Build each service's config from the literal values, as the process would."""
    checked = 0
    for where, workload, env in all_workload_env(compose, manifests):
        if workload not in WORKLOADS or workload == "migrate":
            continue
        for prefix in WORKLOADS[workload]["prefixes"]:
            for name in [n for n in os.environ if n.startswith(prefix)]:
                monkeypatch.delenv(name)
            for name, value in env.items():
                if name.startswith(prefix + "_") and value is not None:
                    monkeypatch.setenv(name, value)
            try:
                load_config(SECTION_BY_PREFIX[prefix].cls, env_prefix=prefix, argv=[])
            except SystemExit:
                pytest.fail(f"{where}: {prefix}_* values are refused (see stderr)")
            checked += 1
        if env.get("ACTIONMESH_TRACE_EXPORTER") is not None:
            assert env["ACTIONMESH_TRACE_EXPORTER"] in EXPORTERS, where
        if env.get("ACTIONMESH_LOG_LEVEL") is not None:
            level = logging.getLevelName(str(env["ACTIONMESH_LOG_LEVEL"]).upper())
            assert isinstance(level, int), f"{where}: ACTIONMESH_LOG_LEVEL"
    assert checked >= 14


# -- Dockerfile ----------------------------------------------------------------------
def test_dockerfile_has_a_target_per_image(stages: dict[str, Stage]) -> None:
    assert {"build", "runtime", "cli", *SERVER_TARGETS} <= set(stages)
    assert stages["build"].base == "python:3.11-slim"
    assert stages["runtime"].base == "python:3.11-slim"
    # The runtime images get only a virtualenv from a build stage, nothing else: the
    # platform's, or (provider-base) the provider SDK's alone.
    copies = [args for stage in stages.values() for kw, args in stage.instructions if kw == "COPY"]
    from_build = sorted(args for args in copies if args.startswith("--from="))
    assert from_build == [
        "--from=build /opt/venv /opt/venv",
        "--from=build-sdk /opt/venv /opt/venv",
    ]
    assert stages["provider-base"].last("COPY") == "--from=build-sdk /opt/venv /opt/venv"
    for name in ("cli", *SERVER_TARGETS):
        chain, stage = [], stages[name]
        while stage.base in stages:
            chain.append(stage.base)
            stage = stages[stage.base]
        assert not {"build", "build-sdk"} & set(chain), f"{name} must not build FROM a build stage"


def test_dockerfile_installs_every_distribution_of_the_project(stages: dict[str, Stage]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {"src", *pyproject["tool"]["actionmesh"]["distributions"]}
    instructions = stages["build"].instructions
    copied = {
        args.split()[0].rstrip("/")
        for kw, args in instructions
        if kw == "COPY" and not args.startswith("--from")
    }
    for folder in folders:
        assert any(folder == c or folder.startswith(f"{c}/") for c in copied), folder
    installs = " ".join(args for kw, args in instructions if kw == "RUN" and "--no-deps" in args)
    for folder in folders - {"src"}:
        assert f"./{folder} " in installs, f"{folder} is not installed"
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()]
    # Everything is ignored first, then what the build copies is let back in.
    assert next(line for line in ignore if not line.startswith("#")) == "*"
    for path in {"src", "pyproject.toml", "README.md", "deploy/docker/requirements.py"} | {
        f.split("/")[0] for f in folders
    }:
        assert any(line.rstrip("/") == f"!{path}" for line in ignore), f"{path} not in context"


def test_runtime_images_run_as_non_root_with_a_healthcheck(stages: dict[str, Stage]) -> None:
    for name in ("cli", *SERVER_TARGETS):
        user = effective(stages, name, "USER")
        assert user is not None, f"{name} has no USER"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: numeric non-root USER, got {user}"
    for name in SERVER_TARGETS:
        check = effective(stages, name, "HEALTHCHECK")
        assert check is not None and "CMD" in check, f"{name} has no HEALTHCHECK"
        assert effective(stages, name, "CMD"), name
    assert effective(stages, "cli", "HEALTHCHECK") == "NONE"


def test_image_healthchecks_ask_the_registered_health_names(stages: dict[str, Stage]) -> None:
    for name in SERVER_TARGETS:
        check = str(effective(stages, name, "HEALTHCHECK"))
        env = stage_env(stages, name)
        workload = WORKLOADS.get(name, WORKLOADS["workitems"])
        port_vars = [v for v in env if v.endswith("_PORT")]
        assert len(port_vars) == 1, name
        port = env[port_vars[0]]
        assert port in effective(stages, name, "EXPOSE").split(), name  # type: ignore[union-attr]
        assert f"${{{port_vars[0]}}}" in check or f"['{port_vars[0]}']" in check, name
        host_vars = [v for v in env if v.endswith("_HOST")]
        assert [env[v] for v in host_vars] == ["0.0.0.0"], f"{name} listens on all interfaces"
        if workload["health"] is None:
            assert "/healthz" in check or "is_healthy" in check
            continue
        assert "actionmesh.rpc.health" in check
        service = re.search(r"--service (\S+)", check)
        assert service and service.group(1) in workload["health"], name


# -- docker-compose.yml --------------------------------------------------------------
def test_compose_runs_the_whole_mesh(compose: dict[str, Any], stages: dict[str, Stage]) -> None:
    services = compose["services"]
    expected = {"postgres", "migrate", "registry", "auditlog", "gateway", "supportdesk"}
    expected |= {"workitems", "records", "escalation", "otel-collector", "jaeger"}
    assert expected <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert "16686:16686" in services["jaeger"]["ports"]
    for name, service in services.items():
        if "build" not in service:
            continue
        build = service["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages, name
        assert service["image"].split(":")[0] == f"actionmesh/{build['target']}", name
        assert "user" not in service, f"{name} keeps the image's non-root user"
    migrate = services["migrate"]
    assert migrate["build"]["target"] == "cli"
    assert migrate["command"] == ["db", "upgrade", "--service", "all"]
    assert migrate["restart"] == "no"


def test_compose_dependencies_wait_for_health(
    compose: dict[str, Any], stages: dict[str, Stage]
) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on with conditions"
        for target, rule in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = rule["condition"]
            if condition == "service_healthy":
                build = services[target].get("build")
                has_check = "healthcheck" in services[target] or (
                    build is not None
                    and "CMD" in str(effective(stages, build["target"], "HEALTHCHECK"))
                )
                assert has_check, f"{name} waits for {target}, which has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", target
    for name in ("registry", "auditlog", "gateway"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    for name in ("registry", "auditlog", "gateway", "workitems", "records", "escalation"):
        assert services[name]["depends_on"]["otel-collector"]["condition"] == "service_started"
    assert services["gateway"]["depends_on"]["registry"]["condition"] == "service_healthy"
    assert services["escalation"]["depends_on"]["supportdesk"]["condition"] == "service_healthy"


def test_compose_services_reach_each_other_by_name(
    compose: dict[str, Any], stages: dict[str, Stage]
) -> None:
    services = compose["services"]

    def port_of(name: str) -> str:
        env = {
            **stage_env(stages, services[name]["build"]["target"]),
            **compose_env(services[name]),
        }
        return str(next(v for k, v in env.items() if k.endswith("_PORT")))

    gateway = compose_env(services["gateway"])
    for key, target in (("REGISTRY", "registry"), ("AUDITLOG", "auditlog")):
        host, port = host_port(str(gateway[f"ACTIONMESH_GATEWAY_{key}"]))
        assert (host, str(port)) == (target, port_of(target))
    for name in ("workitems", "records", "escalation"):
        env = compose_env(services[name])
        # The registry hands this endpoint to the gateways: it must be the service name.
        assert env["ACTIONMESH_PROVIDER_ADVERTISE_HOST"] == name
        assert env["ACTIONMESH_PROVIDER_REGISTRY"] == f"registry:{port_of('registry')}"
    platform = compose_env(services["escalation"])["ACTIONMESH_ESCALATION_PLATFORM_URL"]
    assert platform == f"http://supportdesk:{port_of('supportdesk')}"
    for name, service in services.items():
        env = compose_env(service)
        if env.get("ACTIONMESH_TRACE_EXPORTER") == "otlp":
            endpoint = str(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
            assert re.fullmatch(r"http://otel-collector:4317", endpoint), name
        for key, value in env.items():
            if key.endswith("_DATABASE_URL") and name != "migrate":
                assert value and "@postgres:5432/" in value, f"{name}: {key}"
                migrate_key = key.replace("_DATABASE_URL", "_MIGRATE_ON_START")
                assert env.get(migrate_key) == "false", f"{name}: the migrate service migrates"


def test_compose_files_and_secrets_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        mounts = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = REPO / source
        for key, value in compose_env(service).items():
            if not key.endswith("_FILE") or not value:
                continue
            path = Path(value)
            if path.parent == Path("/run/secrets"):
                assert path.name in service.get("secrets", []), f"{name}: {key}"
                assert (REPO / compose["secrets"][path.name]["file"]).is_file()
            else:
                assert (mounts[str(path.parent)] / path.name).is_file(), f"{name}: {key}"
    collector = services["otel-collector"]
    config_mount = next(v for v in collector["volumes"] if "otel-collector.yaml" in v)
    config = yaml.safe_load((REPO / config_mount.split(":")[0]).read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    exporter = config["exporters"][pipeline["exporters"][0]]
    assert host_port(exporter["endpoint"]) == ("jaeger", 4317)


# -- Kubernetes ----------------------------------------------------------------------
def test_kubernetes_manifests_are_all_listed_and_of_the_expected_kinds(
    manifests: list[dict[str, Any]],
) -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {m["kind"] for m in manifests}
    expected = {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "Job"}
    assert expected | {"HorizontalPodAutoscaler"} <= kinds
    deployments = of_kind(manifests, "Deployment")
    assert {"registry", "auditlog", "gateway", "workitems", "records", "escalation"} <= set(
        deployments
    )
    assert not any("postgres" in name for name in deployments), "PostgreSQL is external"
    namespace = kustomization()["namespace"]
    assert namespace in of_kind(manifests, "Namespace")
    images = {entry["name"] for entry in kustomization()["images"]}
    for workload in [*deployments.values(), *of_kind(manifests, "Job").values()]:
        for container in pod_spec(workload)["containers"]:
            assert container["image"].split(":")[0] in images


def test_deployments_probe_the_health_names_their_servers_register(
    manifests: list[dict[str, Any]],
) -> None:
    for name, deployment in of_kind(manifests, "Deployment").items():
        assert name in WORKLOADS, f"add {name} to WORKLOADS"
        health = WORKLOADS[name]["health"]
        (container,) = pod_spec(deployment)["containers"]
        ports = {p["containerPort"] for p in container["ports"]}
        for probe_kind in ("readinessProbe", "livenessProbe"):
            probe = container[probe_kind]
            if health is None:
                assert probe["httpGet"]["path"] == "/healthz", name
                assert probe["httpGet"]["port"] in ports, name
                continue
            assert probe["grpc"]["port"] in ports, f"{name} {probe_kind} port"
            assert probe["grpc"].get("service", "") in health, f"{name} {probe_kind} service"
        env = {e["name"]: e.get("value") for e in container["env"]}
        port_setting = next(k for k in env if k.endswith("_PORT") and "METRICS" not in k)
        listening = int(str(env[port_setting]))
        assert listening in ports, f"{name} listens on a declared containerPort"
        if health is not None:
            assert container["readinessProbe"]["grpc"]["port"] == listening


def test_services_select_their_deployments(manifests: list[dict[str, Any]]) -> None:
    deployments = of_kind(manifests, "Deployment")
    for name, service in of_kind(manifests, "Service").items():
        deployment = deployments[name]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        (container,) = pod_spec(deployment)["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{name}: targetPort {port['targetPort']}"
            assert port["port"] == named[port["targetPort"]], name


def test_pods_run_as_non_root_with_read_only_root_and_resources(
    manifests: list[dict[str, Any]],
) -> None:
    workloads = [*of_kind(manifests, "Deployment").values(), *of_kind(manifests, "Job").values()]
    for workload in workloads:
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] != 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert security.get("runAsUser", pod_security["runAsUser"]) != 0, name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert {"cpu", "memory"} <= set(resources["limits"]), name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a writable /tmp on a read-only root"


def test_providers_advertise_their_service(manifests: list[dict[str, Any]]) -> None:
    services = of_kind(manifests, "Service")
    config_maps = of_kind(manifests, "ConfigMap")
    for name, deployment in of_kind(manifests, "Deployment").items():
        (container,) = pod_spec(deployment)["containers"]
        env = k8s_env(container, config_maps)
        for key, value in env.items():
            if key in ("ACTIONMESH_GATEWAY_REGISTRY", "ACTIONMESH_GATEWAY_AUDITLOG") or (
                key == "ACTIONMESH_PROVIDER_REGISTRY"
            ):
                host, port = host_port(str(value))
                assert port in [p["port"] for p in services[host]["spec"]["ports"]], key
        if "ACTIONMESH_PROVIDER_ADVERTISE_HOST" in env:
            host = str(env["ACTIONMESH_PROVIDER_ADVERTISE_HOST"])
            assert host == name, f"{name} registers the address of its own Service"
            ports = [p["port"] for p in services[host]["spec"]["ports"]]
            assert int(str(env["ACTIONMESH_PROVIDER_PORT"])) in ports
    escalation = k8s_env(
        pod_spec(of_kind(manifests, "Deployment")["escalation"])["containers"][0], config_maps
    )
    url = str(escalation["ACTIONMESH_ESCALATION_PLATFORM_URL"])
    assert url == f"http://supportdesk:{services['supportdesk']['spec']['ports'][0]['port']}"


def test_gateway_scales_with_a_horizontal_pod_autoscaler(manifests: list[dict[str, Any]]) -> None:
    (hpa,) = of_kind(manifests, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "gateway",
    )
    assert "gateway" in of_kind(manifests, "Deployment")
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # The autoscaler owns the replica count; a fixed one would fight it on every apply.
    assert "replicas" not in of_kind(manifests, "Deployment")["gateway"]["spec"]


def test_policy_config_map_is_the_shipped_policy_and_is_mounted(
    manifests: list[dict[str, Any]],
) -> None:
    config_map = of_kind(manifests, "ConfigMap")["actionmesh-policies"]
    policy = Path(DEFAULT_POLICY_FILE)
    assert config_map["data"][policy.name] == policy.read_text(), (
        "deploy/kubernetes/configmap-policies.yaml differs from gateway/policies/default.cedar"
    )
    gateway = pod_spec(of_kind(manifests, "Deployment")["gateway"])
    (container,) = gateway["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    policy_file = Path(str(env["ACTIONMESH_GATEWAY_POLICY_FILE"]))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(policy_file.parent))
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    volume = next(v for v in gateway["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "actionmesh-policies"
    assert policy_file.name in config_map["data"]


def test_mounted_files_and_secrets_exist(manifests: list[dict[str, Any]]) -> None:
    secrets = of_kind(manifests, "Secret")
    config_maps = of_kind(manifests, "ConfigMap")
    checked = 0
    for name, workload in [
        *of_kind(manifests, "Deployment").items(),
        *of_kind(manifests, "Job").items(),
    ]:
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: {ref}"
                    checked += 1
                if item["name"].endswith("_FILE") and item.get("value"):
                    path = Path(item["value"])
                    volume = mounts[str(path.parent)]
                    if "secret" in volume:
                        keys = secrets[volume["secret"]["secretName"]]["stringData"]
                    else:
                        keys = config_maps[volume["configMap"]["name"]]["data"]
                    assert path.name in keys, f"{name}: {item['name']}"
                    checked += 1
    assert checked >= 9  # 3 gateway files + the database URL of 3 services and the job
    for secret in secrets.values():
        for value in secret["stringData"].values():
            assert "REPLACE-ME" in value, "secrets.yaml holds placeholders only"


def test_services_migrate_through_the_job_only(manifests: list[dict[str, Any]]) -> None:
    job = of_kind(manifests, "Job")[K8S_MIGRATION_JOB]
    (container,) = pod_spec(job)["containers"]
    assert container["image"].split(":")[0] == "actionmesh/cli"
    assert container.get("args") == ["db", "upgrade", "--service", "all"]
    job_env = {e["name"] for e in container["env"]}
    for prefix in WORKLOADS["migrate"]["prefixes"]:
        assert f"{prefix}_DATABASE_URL" in job_env
    for name, deployment in of_kind(manifests, "Deployment").items():
        (container,) = pod_spec(deployment)["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for key in [k for k in env if k.endswith("_DATABASE_URL")]:
            assert env[key.replace("_DATABASE_URL", "_MIGRATE_ON_START")] == "false", name
