"""``actionmesh provider new|serve|check``, run as the processes a provider author runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.conformance import CHECKS
from actionmesh.provider_cli import ProviderCliError, load_provider, new_project
from actionmesh.providers.workitems import workitems
from actionmesh.v1 import provider_pb2, provider_pb2_grpc
from tests.broken_provider import BrokenServer, start_broken_provider
from tests.containers import require_engine

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_FILES = {
    ".dockerignore",
    "Dockerfile",
    "README.md",
    "pyproject.toml",
    "demo/__init__.py",
    "demo/__main__.py",
    "demo/provider.py",
    "tests/test_demo.py",
}


async def run(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout_s: float = 60
) -> tuple[int, str]:
    """Run a command without blocking the loop (in-process servers keep serving)."""
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "250", "ACTIONMESH_LOG_LEVEL": "WARNING", **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, output.decode()


def provider_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "actionmesh.provider_cli", "provider", *args]


@pytest.fixture
async def broken() -> AsyncIterator[BrokenServer]:
    server = await start_broken_provider()
    try:
        yield server
    finally:
        await server.stop()


# -- new -----------------------------------------------------------------------
async def test_new_creates_a_project_whose_own_test_passes(tmp_path: Path) -> None:
    code, output = await run(*provider_cli("new", "demo", "--dir", str(tmp_path)))
    assert code == 0, output
    project = tmp_path / "demo"
    created = {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}
    assert created == TEMPLATE_FILES
    assert "{{name}}" not in "".join((project / name).read_text() for name in TEMPLATE_FILES), (
        "a placeholder was left in the generated files"
    )
    dockerfile = (project / "Dockerfile").read_text()
    assert "FROM python:3.11-slim AS build" in dockerfile
    assert "USER provider" in dockerfile and "HEALTHCHECK" in dockerfile
    assert (
        'Provider("demo", version="0.1.0", dedupe=True)'
        in (project / "demo" / "provider.py").read_text()
    )

    code, output = await run(
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        cwd=project,
        env={"PYTHONPATH": str(project)},
        timeout_s=90,
    )
    assert code == 0, output
    assert "2 passed" in output


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("Demo", "not a valid provider name"),
        ("my-provider", "not a valid provider name"),
        ("x", "not a valid provider name"),
        ("9lives", "not a valid provider name"),
        ("class", "not a valid provider name"),
        ("json", "would shadow"),
        ("actionmesh", "would shadow"),
        ("opentelemetry", "would shadow"),
    ],
)
def test_new_refuses_bad_names(tmp_path: Path, name: str, why: str) -> None:
    with pytest.raises(ProviderCliError, match=why):
        new_project(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_new_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    code, output = await run(*provider_cli("new", "demo", "--dir", str(tmp_path)))
    assert code == 1
    assert "already exists" in output
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["keep.txt"]


# -- serve ---------------------------------------------------------------------
async def test_serve_runs_a_provider_until_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    process = await asyncio.create_subprocess_exec(
        *provider_cli(
            "serve",
            "actionmesh.providers.workitems:workitems",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--seed-demo",
            "true",
            "--ready-file",
            str(ready),
        ),
        cwd=REPO,
        env={**os.environ, "ACTIONMESH_LOG_LEVEL": "WARNING"},
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.returncode is None, "provider serve exited early"
            assert time.monotonic() < deadline, "provider serve never became ready"
            await asyncio.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        async with grpc.aio.insecure_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            described = await provider_pb2_grpc.ActionProviderServiceStub(channel).Describe(
                provider_pb2.DescribeRequest(), timeout=5
            )
            assert described.provider_id == "workitems"

        # The same provider, served by the CLI, passes the kit through the CLI.
        code, output = await run(
            *provider_cli(
                "check", address, "--record", "acme/workitem/wi-1001:failed", "--require-all"
            )
        )
        assert code == 0, output
        # workitems has no long-running and no previewable action: those checks do not
        # apply (but its actions' Preview is checked to be UNIMPLEMENTED).
        not_applicable = [
            name
            for name in CHECKS
            if name.startswith(("long_running.", "preview.")) and name != "preview.unsupported"
        ]
        summary = (
            f"{len(CHECKS) - len(not_applicable)} passed, 0 failed, {len(not_applicable)} skipped"
        )
        assert "PASSED" in output and summary in output

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("actionmesh.providers.workitems:nope", "has no attribute 'nope'"),
        ("json:dumps", "is a function, not a actionmesh.sdk.Provider"),
        ("no_such_module_here:provider", "cannot import no_such_module_here"),
        ("json", "holds 0 Provider objects"),
    ],
)
async def test_serve_explains_a_bad_target(target: str, message: str) -> None:
    code, output = await run(*provider_cli("serve", target, "--port", "0"))
    assert code == 1
    assert message in " ".join(output.split())


def test_a_module_with_one_provider_needs_no_attribute() -> None:
    assert load_provider("actionmesh.providers.workitems") is workitems
    assert load_provider("actionmesh.providers.workitems.provider:workitems") is workitems


# -- check ---------------------------------------------------------------------
# The checks that do not apply to the broken provider (see its docstring).
NOT_APPLICABLE = ("source.", "status.", "long_running.", "preview.")


async def test_check_fails_the_broken_provider_with_a_table(broken: BrokenServer) -> None:
    code, output = await run(
        *provider_cli("check", broken.address, "--record", "acme/thing/t-1:ready", "--timeout", "3")
    )
    assert code == 1, output
    lines = output.splitlines()
    for name in CHECKS:
        row = next((line for line in lines if f" {name} " in line), "")
        assert row, f"no table row for {name}:\n{output}"
        # It sources no record type, keeps no execution status and previews nothing: the
        # source, status and preview checks do not apply (its Preview is UNIMPLEMENTED).
        expected = "SKIP" if name.startswith(NOT_APPLICABLE) else "FAIL"
        passed = name in ("describe", "preview.unsupported")
        assert ("PASS" if passed else expected) in row, row
    assert "FAILED" in output and "2 passed, 9 failed, 17 skipped" in output

    code, output = await run(
        *provider_cli("check", broken.address, "--json", "--record", "acme/thing/t-1:ready")
    )
    assert code == 1
    report = json.loads(output)
    assert report["passed"] is False
    assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == [
        name
        for name in CHECKS
        if name not in ("describe", "preview.unsupported") and not name.startswith(NOT_APPLICABLE)
    ]


async def test_check_exit_codes_for_skips_and_usage_errors(tmp_path: Path) -> None:
    from actionmesh.sdk import ProviderConfig, start_provider

    server = await start_provider(
        workitems, ProviderConfig(port=0, data_dir=str(tmp_path), seed_demo=True)
    )
    try:
        code, output = await run(*provider_cli("check", server.address, "--json"))
        assert code == 0, output
        skipped = [c["name"] for c in json.loads(output)["checks"] if c["status"] == "skip"]
        # Without a --record: nothing to execute (so no executed key to ask the status of),
        # and no workitem for the source checks to read.
        assert skipped == [
            "source.tenant_isolation",
            "source.answer",
            "source.stable",
            "preview.stable",
            "preview.read_only",
            "execute.idempotent",
            "preview.matches_execute",
            "status.finished",
            "status.tenant_isolation",
            "long_running.accepted",
            "long_running.progress",
            "long_running.stop",
        ]

        code, output = await run(*provider_cli("check", server.address, "--require-all"))
        assert code == 1
        assert "skipped but required" in " ".join(output.split())

        code, output = await run(*provider_cli("check", server.address, "--record", "acme/wi"))
        assert code == 1
        assert "TENANT/TYPE/ID" in output
    finally:
        await server.stop(grace_s=1.0)

    code, output = await run(*provider_cli("check", "127.0.0.1:1", "--timeout", "1"))
    assert code == 1
    assert "UNAVAILABLE" in output


# -- the generated Dockerfile ----------------------------------------------------
@pytest.mark.timeout(900)
async def test_the_generated_image_builds_runs_as_non_root_and_passes_the_kit(
    tmp_path: Path,
) -> None:
    require_engine()
    assert new_project("dockdemo", tmp_path)
    project = tmp_path / "dockdemo"
    # The image carries the provider SDK alone: build its wheel from a copy, so the
    # repository gets no build/ folder.
    source = tmp_path / "sdk-src"
    shutil.copytree(
        REPO / "providers" / "sdk",
        source,
        ignore=shutil.ignore_patterns(".*cache", "*.egg-info", "build", "__pycache__"),
    )
    code, output = await run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(project / "dist"), str(source), timeout_s=300,
    )  # fmt: skip
    assert code == 0, output
    assert [p.name.split("-")[0] for p in (project / "dist").iterdir()] == ["actionmesh_sdk"]
    tag = f"actionmesh-test-dockdemo:{uuid.uuid4().hex[:8]}"
    code, output = await run(
        "docker", "build", "--network", "host", "-q", "-t", tag, str(project), timeout_s=600
    )
    assert code == 0, output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    name = f"dockdemo-{uuid.uuid4().hex[:8]}"
    code, output = await run(
        "docker", "run", "-d", "--name", name, "--network", "host",
        "-e", f"ACTIONMESH_PROVIDER_PORT={port}", tag,
    )  # fmt: skip
    assert code == 0, output
    try:
        code, output = await run("docker", "exec", name, "id", "-u")
        assert output.strip() == "10001"
        # The same probe as the image's HEALTHCHECK, run inside the container.
        health = ("docker", "exec", name, "python", "-m", "actionmesh.rpc.health")
        deadline = time.monotonic() + 60
        while (await run(*health, f"127.0.0.1:{port}"))[0] != 0:
            assert time.monotonic() < deadline, "the container never became healthy"
            await asyncio.sleep(0.5)
        code, output = await run(
            *provider_cli(
                "check", f"127.0.0.1:{port}", "--record", "acme/ticket/t-1:open", "--require-all"
            )
        )
        assert code == 0, output
        await run("docker", "stop", "-t", "10", name, timeout_s=30)
        _, output = await run("docker", "inspect", "--format", "{{.State.ExitCode}}", name)
        assert output.strip() == "0", "the provider did not stop cleanly on SIGTERM"
    finally:
        await run("docker", "rm", "-f", name, timeout_s=30)
        await run("docker", "rmi", "-f", tag, timeout_s=60)
