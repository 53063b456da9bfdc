"""The benchmark's own child processes (proxy, fan-out providers, ingest audit logs, load
generator): started like the mesh's, announced by ready files, always stopped.

The services of the mesh itself run under :class:`actionmesh.mesh.Mesh`; this
module starts the few extra processes the same way (``python -m MODULE`` in a new
session, logs under the run's directory, ready file, grpc.health.v1 SERVING) and
reads each process's peak resident memory from ``/proc/PID/status`` (VmHWM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from actionmesh.mesh import is_serving, tail


class ChildError(RuntimeError):
    """A benchmark child failed to start or answer."""


def peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident set size (VmHWM) of a live process in MiB; None when unknown."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return None


@dataclass
class Child:
    """One started child process and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    ready: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace_s: float = 10.0) -> None:
        stop_process(self.process, grace_s)


def stop_process(process: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; returns once the process is gone."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@dataclass
class Launched:
    """A child that was started and has not announced itself yet."""

    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path

    def wait_ready(self, timeout_s: float = 60.0) -> Child:
        """Wait for the ready file and health SERVING; stop the child if it never comes."""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ChildError(
                        f"{self.name} exited with {self.process.returncode}; last log lines:\n"
                        f"{tail(self.log_path)}"
                    )
                if self.ready_file.exists():
                    ready = json.loads(self.ready_file.read_text())
                    if is_serving(ready["address"]):
                        return Child(
                            self.name, self.process, ready["address"], self.log_path, ready
                        )
                time.sleep(0.05)
            raise ChildError(
                f"{self.name} was not serving within {timeout_s}s:\n{tail(self.log_path)}"
            )
        except BaseException:
            self.stop(5.0)
            raise

    def stop(self, grace_s: float = 10.0) -> None:
        stop_process(self.process, grace_s)


def launch_child(
    name: str, module: str, args: list[str], run_dir: Path, *, env: dict[str, str] | None = None
) -> Launched:
    """Start ``python -m module args --ready-file F`` in its own session; do not wait."""
    ready_file = run_dir / "run" / f"{name}.json"
    log_path = run_dir / "logs" / f"{name}.log"
    ready_file.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ready_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", module, *args, "--ready-file", str(ready_file)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    return Launched(name, process, ready_file, log_path)


def start_child(
    name: str,
    module: str,
    args: list[str],
    run_dir: Path,
    *,
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> Child:
    """:func:`launch_child`, then wait until it serves."""
    return launch_child(name, module, args, run_dir, env=env).wait_ready(timeout_s)


class LoadGenerator:
    """The load generator process (:mod:`actionmesh.bench.loadgen`), one spec at a time."""

    def __init__(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: TextIO = log_path.open("a")
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "actionmesh.bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Send one spec and wait for its result line (the spec's durations bound it)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise ChildError(f"the load generator exited; log:\n{tail(self.log_path)}")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise ChildError(
                f"load generator failed on a {spec.get('kind')} run: {result['error']}"
            )
        return result

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(json.dumps({"kind": "quit"}) + "\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop_process(self.process, 2.0)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
