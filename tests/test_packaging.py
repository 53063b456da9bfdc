"""The distributions as a user installs them: wheels built from this checkout, each
installed into a fresh virtualenv, so a missing package-data file, a missing
dependency or a stray top-level package fails here.

- ``actionmesh-sdk`` alone (what a provider team installs): few distributions, a
  small site-packages, none of the platform's server dependencies, and a provider
  made by ``actionmesh provider new`` serves on it and passes the conformance kit.
- the whole platform (``actionmesh``): every module imports, the package data the
  services read at run time is there (migrations, the default policy, the provider
  template), and nothing but the ``actionmesh`` namespace lands in site-packages.

The numbers measured are written to the test log (``-s`` shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actionmesh.rpc.health import is_serving

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]
ROOT = tomllib.loads((REPO / "pyproject.toml").read_text())
MEMBERS = ["", *ROOT["tool"]["actionmesh"]["distributions"]]
# Issue 15: a fresh install of the SDK brings at most this much (pip and setuptools,
# which every virtualenv has, not counted).
SDK_MAX_DISTRIBUTIONS = 12
SDK_MAX_MIB = 60.0
# Installed by a virtualenv itself, not by what we install into it.
VENV_OWN = {"pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth"}
SERVER_DEPENDENCIES = {
    "sqlalchemy",
    "alembic",
    "psycopg",
    "cedarpy",
    "pyjwt",
    "cryptography",
    "grpcio-tools",
    "mypy-protobuf",
    "opentelemetry-sdk",
    "rich",
    "httpx",
}


@dataclass(frozen=True)
class Venv:
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def site_packages(self) -> Path:
        (found,) = (self.path / "lib").glob("python3*/site-packages")
        return found

    def run(self, *args: str, timeout: float = 600, **kwargs: object) -> str:
        done = subprocess.run(
            [self.python, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[arg-type]
        )
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    def install(self, wheels: Path, *requirements: str) -> None:
        self.run("-m", "pip", "install", "-q", "--find-links", str(wheels), *requirements)

    def distributions(self) -> dict[str, str]:
        listed = json.loads(self.run("-m", "pip", "list", "--format", "json"))
        return {d["name"].lower(): d["version"] for d in listed}

    def size_mib(self, *, skip: set[str]) -> float:
        """Disk usage (as du counts it) of site-packages, less the entries in ``skip``
        and their dist-info folders."""
        total = 0
        for entry in self.site_packages.iterdir():
            name = entry.name.split("-")[0] if entry.name.endswith(".dist-info") else entry.name
            if name in skip:
                continue
            paths = [entry] if entry.is_file() else [entry, *entry.rglob("*")]
            total += sum(p.lstat().st_blocks * 512 for p in paths)
        return total / 2**20


def new_venv(path: Path) -> Venv:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return Venv(path)


def test_requirements_txt_installs_every_distribution_in_layer_order() -> None:
    """requirements.txt cannot read pyproject.toml: it must list the same folders."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    folders = [
        line.split()[1].removeprefix("./").split("[")[0] for line in lines if line.startswith("-e ")
    ]
    assert folders == [*ROOT["tool"]["actionmesh"]["distributions"], "."]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel per distribution, built (``python -m build``, isolated) from a copy of
    the checkout, so the repository gets no build/ or egg-info folders."""
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    ignore = shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "build", ".*cache", ".venv", ".git", ".tools"
    )
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in {m.split("/")[0] for m in MEMBERS if m} | {"src"}:
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    out = work / "wheels"
    builds = [
        subprocess.Popen(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source / member)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for member in MEMBERS
    ]
    for member, build in zip(MEMBERS, builds, strict=True):
        output, _ = build.communicate(timeout=600)
        assert build.returncode == 0, f"{member or 'actionmesh'}: {output[-3000:]}"
    return out


def test_one_wheel_per_distribution(wheels: Path) -> None:
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    expected = sorted(
        tomllib.loads((REPO / m / "pyproject.toml").read_text())["project"]["name"].replace(
            "-", "_"
        )
        for m in MEMBERS
    )
    assert names == expected


@pytest.fixture(scope="module")
def sdk_env(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    env = new_venv(tmp_path_factory.mktemp("sdk") / "venv")
    env.install(wheels, "actionmesh-sdk")
    return env


def test_the_sdk_installs_alone_small_and_without_the_platform(sdk_env: Venv) -> None:
    installed = sdk_env.distributions()
    ours = {name for name in installed if name not in VENV_OWN}
    size = sdk_env.size_mib(skip=VENV_OWN)
    print(
        f"\nactionmesh-sdk alone: {len(ours)} distributions, {size:.1f} MiB "
        f"(site-packages in all {sdk_env.size_mib(skip=set()):.1f} MiB): {sorted(ours)}"
    )
    assert "actionmesh-sdk" in ours
    assert len(ours) <= SDK_MAX_DISTRIBUTIONS, sorted(ours)
    assert size <= SDK_MAX_MIB
    assert not ours & SERVER_DEPENDENCIES, ours & SERVER_DEPENDENCIES
    assert not {n for n in ours if n.startswith("actionmesh") and n != "actionmesh-sdk"}
    # What the SDK distribution offers imports with what it declares, nothing more.
    sdk_env.run(
        "-c",
        "import actionmesh.sdk, actionmesh.client, actionmesh.rpc.health, actionmesh.rpc.server;"
        "import actionmesh.v1.gateway_pb2_grpc, actionmesh.v1.provider_pb2_grpc;"
        "from actionmesh.rpc.telemetry import HAVE_OTEL_SDK; assert not HAVE_OTEL_SDK",
    )


@pytest.fixture
def served_template(sdk_env: Venv, wheels: Path, tmp_path: Path) -> Iterator[str]:
    """A provider project from ``actionmesh provider new``, installed into the SDK-only
    environment and served from there; yields its address."""
    made = subprocess.run(
        [sys.executable, "-m", "actionmesh.cli", "provider", "new", "leannotes"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    sdk_env.install(wheels, str(tmp_path / "leannotes"))
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [
            sdk_env.python,
            "-m",
            "leannotes",
            "--port",
            "0",
            "--seed-demo",
            "true",
            "--data-dir",
            str(tmp_path / "data"),
            "--ready-file",
            str(ready),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "ACTIONMESH_TRACE_EXPORTER": "none"},
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the provider never wrote its ready file"
            time.sleep(0.1)
        address = json.loads(ready.read_text())["address"]
        assert is_serving(address, timeout_s=5)
        yield address
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.communicate()[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_a_new_provider_runs_on_the_sdk_alone(served_template: str) -> None:
    # The conformance kit comes with the platform (this test environment); the provider
    # it judges runs in the SDK-only one, idempotent execution on its SQLite file included.
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "actionmesh.cli",
            "provider",
            "check",
            served_template,
            "--record",
            "acme/ticket/t-1:open",
            "--require-all",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["passed"], report
    # Every check passes, GetExecutionStatus (from its dedupe store) included, but the
    # source.* checks: the template is the system of record of nothing, so they do not apply;
    # neither do the long_running.* ones (it declares no long-running action) nor the
    # preview.* ones but preview.unsupported (it previews nothing).
    assert all(
        c["status"] == "pass"
        or (
            c["name"].startswith(("source.", "long_running.", "preview.")) and c["status"] == "skip"
        )
        for c in report["checks"]
    ), report
    assert {c["name"] for c in report["checks"] if c["status"] == "pass"} >= {
        "execute.idempotent",
        "status.unknown_key",
        "status.finished",
        "status.stable",
        "status.tenant_isolation",
    }, report


@pytest.fixture(scope="module")
def platform_env(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    env = new_venv(tmp_path_factory.mktemp("platform") / "venv")
    env.install(wheels, "actionmesh")
    return env


def test_the_platform_adds_only_the_actionmesh_namespace(platform_env: Venv) -> None:
    top_levels: set[str] = set()
    for record in platform_env.site_packages.glob("actionmesh*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            first = line.split(",", 1)[0].split("/", 1)[0]
            if not first.endswith(".dist-info") and first != "..":  # ../../bin/actionmesh
                top_levels.add(first)
    assert top_levels == {"actionmesh"}
    assert not (platform_env.site_packages / "actionmesh" / "__init__.py").exists()
    installed = platform_env.distributions()
    assert not {"grpcio-tools", "mypy-protobuf"} & set(installed), "build tools at run time"
    print(
        f"\nthe platform: {len(installed)} distributions, "
        f"{platform_env.size_mib(skip=VENV_OWN):.1f} MiB"
    )


def test_every_platform_module_imports_and_its_package_data_is_there(
    platform_env: Venv, tmp_path: Path
) -> None:
    # codegen regenerates the contract from a checkout; it needs the build tools of
    # the test extra, which no installed platform has.
    platform_env.run(
        "-c",
        "import pkgutil, importlib, actionmesh\n"
        "dev_only = {'actionmesh.codegen'}\n"
        "names = [m.name for m in pkgutil.walk_packages(actionmesh.__path__, 'actionmesh.')]\n"
        "assert len(names) > 100, names\n"
        "for name in names:\n"
        "    if name not in dev_only and not name.endswith('__main__') and '.migrations.' "
        "not in name:\n"
        "        importlib.import_module(name)\n"
        "from pathlib import Path\n"
        "from actionmesh.gateway.config import DEFAULT_POLICY_FILE\n"
        "assert Path(DEFAULT_POLICY_FILE).is_file(), DEFAULT_POLICY_FILE\n"
        "for pkg in ('sdk', 'client', 'rpc', 'v1', 'runtime', 'gateway', 'registry', "
        "'auditlog', 'providers', 'conformance'):\n"
        "    typed = importlib.import_module('actionmesh.' + pkg).__path__[0]\n"
        "    assert (Path(typed) / 'py.typed').is_file(), pkg\n",
        cwd=tmp_path,
    )
    bin_dir = Path(platform_env.python).parent
    database = tmp_path / "all.db"
    upgraded = subprocess.run(
        [
            str(bin_dir / "actionmesh"),
            "db",
            "upgrade",
            "--service",
            "all",
            "--json",
            "--database-url",
            f"sqlite:///{database}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert {row["service"] for row in json.loads(upgraded.stdout) if row["at_head"]} == {
        "gateway",
        "auditlog",
        "registry",
    }
    made = subprocess.run(
        [str(bin_dir / "actionmesh"), "provider", "new", "fromwheel"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    project = tmp_path / "fromwheel"
    for expected in ("pyproject.toml", "Dockerfile", ".dockerignore", "fromwheel/provider.py"):
        assert (project / expected).is_file(), expected
