"""One benchmark run, end to end: start what it needs, measure, stop everything.

Phases, in order, all on 127.0.0.1 under a temporary directory:

1. a mesh (registry, audit log, gateway, the bench provider) started by
   :class:`actionmesh.mesh.Mesh`, plus the pass-through proxy in front of the
   same provider; ExecuteAction direct, through the proxy and through the gateway
   at each concurrency, the end-to-end audit lag probed during the loaded gateway
   run, then the audit count check (2 events per successful execution);
2. fan-out providers registered in the same mesh; DiscoverActions over 1, 8, 32
   providers and with one hanging; the discovery audit events counted;
3. the mesh stopped; AppendEvents ingest on SQLite, then PostgreSQL if given.

Peak RSS of every process is read before it stops. Whatever happens (error,
Ctrl-C, SIGTERM), every process started here is stopped before returning.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from actionmesh.bench import audit
from actionmesh.bench.config import BenchConfig, as_dict
from actionmesh.bench.fanout import HANG_PROVIDER_ID, HANG_RECORD_TYPE, record_type
from actionmesh.bench.noop import ACTION_ID, RECORD_TYPE
from actionmesh.bench.procs import (
    Child,
    ChildError,
    Launched,
    LoadGenerator,
    launch_child,
    peak_rss_mb,
    start_child,
)
from actionmesh.bench.report import SCHEMA_VERSION, evaluate_targets
from actionmesh.gateway.auth import SERVICE_METADATA, mint_service_token, mint_token
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODES = ("direct", "bare_hop", "gateway")
EXEC_TENANT = "bench-exec"
FANOUT_TENANT = "bench-fanout"
# Readiness probes run in a tenant of their own, so they never enter the counts.
READY_TENANT = "bench-ready"
SUBJECT = "bench"
FANOUT_PROCESSES = 2
READY_TIMEOUT_S = 60.0
# High enough that the admission check is measured without refusing anything.
BENCH_TENANT_RATE = "1000000/second"
# The bench plays the product backend that vouches for its records' facts (a trusted
# caller of the gateway for the bench record type, which has no system of record):
# without it the default policy refuses to execute on the caller's word.
BENCH_BACKEND = "bench-backend"
BENCH_TRUSTED_CALLERS = f"{BENCH_BACKEND}={RECORD_TYPE}"

Progress = Callable[[str], None]


class BenchError(RuntimeError):
    """The benchmark could not run (a service failed, a count could not be taken)."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every child is stopped on the way out."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        # Other work on the machine skews absolute numbers (ratios less so).
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _gateway_stub(address: str) -> tuple[grpc.Channel, gateway_pb2_grpc.ActionGatewayServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, gateway_pb2_grpc.ActionGatewayServiceStub(channel)


def _ready_record(record_type_: str, record_id: str) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(
        tenant=READY_TENANT,
        type=record_type_,
        id=record_id,
        status="open",
        sensitivity=common_pb2.SENSITIVITY_NORMAL,
    )


def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            if check():
                return
        time.sleep(0.2)
    raise BenchError(f"{what} within {timeout_s:.0f}s")


def service_metadata(service_token: str) -> tuple[str, str]:
    """The bench backend's own token, sent next to the operator's."""
    return (SERVICE_METADATA, f"Bearer {service_token}")


def wait_gateway_executes(address: str, token: str, service_token: str) -> None:
    """Until the gateway's directory has the bench provider SERVING (an execution succeeds)."""
    channel, stub = _gateway_stub(address)
    metadata = (("authorization", f"Bearer {token}"), service_metadata(service_token))
    attempt = 0

    def executes() -> bool:
        nonlocal attempt
        attempt += 1
        reply = stub.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id=ACTION_ID,
                record=_ready_record(RECORD_TYPE, "ready"),
                inputs={"note": common_pb2.InputValue(string_value="ready")},
                idempotency_key=f"ready-{attempt}",
            ),
            metadata=metadata,
            timeout=5.0,
        )
        return bool(reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED)

    with channel:
        _until(executes, READY_TIMEOUT_S, "the gateway could not execute the bench action")


def wait_gateway_fans_out(address: str, token: str, largest: int) -> None:
    """Until the gateway sees every fan-out provider, the hanging one included."""
    channel, stub = _gateway_stub(address)
    metadata = (("authorization", f"Bearer {token}"),)

    def discovers(kind: str, hang: bool) -> bool:
        reply = stub.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(
                record=_ready_record(kind, "ready"), skip_cache=True
            ),
            metadata=metadata,
            timeout=5.0,
        )
        complete = len(reply.actions) == largest
        if not hang:
            return complete
        return complete and any(d.provider_id == HANG_PROVIDER_ID for d in reply.degraded_providers)

    with channel:
        _until(
            lambda: discovers(record_type(largest), False),
            READY_TIMEOUT_S,
            f"the gateway did not see {largest} fan-out providers",
        )
        _until(
            lambda: discovers(HANG_RECORD_TYPE, True),
            READY_TIMEOUT_S,
            "the gateway did not see the hanging provider",
        )


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profiler(path: str, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy record of ``pid`` for ``seconds``, format from the file's extension."""
    py_spy = find_py_spy()
    if py_spy is None:
        return None
    suffix = Path(path).suffix.lower()
    fmt = {".json": "speedscope", ".txt": "raw"}.get(suffix, "flamegraph")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "200",
            # Sample without pausing the gateway, so profiling barely slows what it measures.
            "--nonblocking",
            "--format",
            fmt,
            "--output",
            path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


class Bench:
    """The state of one run; :meth:`run` returns the report (a JSON-ready dict)."""

    def __init__(self, config: BenchConfig, progress: Progress) -> None:
        self.config = config
        self.progress = progress
        self.run_dir = Path(tempfile.mkdtemp(prefix="actionmesh-bench-"))
        self.rss: dict[str, float | None] = {}
        self.report: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tool": "actionmesh bench",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": as_dict(config),
        }

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self._run_phases()
        except BaseException:
            self._keep_logs()
            raise
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.report["machine"]["load_average_at_end"] = (
            list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        )
        self.report["rss_mb"] = self.rss
        self.report["duration_s"] = round(time.monotonic() - started, 2)
        self.report["targets"] = evaluate_targets(self.report)
        self.report["audit_events_lost"] = self._events_lost()
        return self.report

    def _run_phases(self) -> None:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            loadgen = LoadGenerator(self.run_dir / "logs" / "loadgen.log")
            stack.callback(loadgen.close)
            # The ingest audit logs idle until phase 3; starting them now overlaps start-ups.
            auditlogs = self._launch_auditlogs()
            for launched in auditlogs.values():
                stack.callback(launched.stop)
            mesh = Mesh(
                MeshSettings(
                    data_dir=self.run_dir / "mesh",
                    registry_port=0,
                    auditlog_port=0,
                    gateway_port=0,
                    supportdesk_port=0,
                    provider_modules=("actionmesh.bench.noop",),
                    seed_demo=False,
                    health_check_interval_s=1.0,
                    extra_env={
                        "ACTIONMESH_GATEWAY_DISCOVER_TIMEOUT_S": str(
                            self.config.discover_timeout_s
                        ),
                        # The per-tenant rate limiter still runs on every call, but at a
                        # rate no run reaches: the bench measures capacity, not fair use.
                        "ACTIONMESH_GATEWAY_TENANT_RATE_LIMIT": BENCH_TENANT_RATE,
                        "ACTIONMESH_GATEWAY_TRUSTED_CALLERS": BENCH_TRUSTED_CALLERS,
                    },
                )
            )
            stack.callback(mesh.stop)
            self.progress("starting the mesh (registry, audit log, gateway, bench provider)")
            mesh.start()
            proxy = start_child(
                "proxy", "actionmesh.bench.proxy", ["--target", mesh.address("noop")], self.run_dir
            )
            stack.callback(proxy.stop)
            self._execute_modes(mesh, proxy, loadgen)
            self._fanout(mesh, loadgen)
            self._record_rss(mesh, [proxy], loadgen)
            self.progress("stopping the mesh")
            stop_all([proxy.stop, *(partial(mesh.stop_service, name) for name in mesh.services)])
            self._ingest(loadgen, auditlogs)
            self.rss["loadgen"] = peak_rss_mb(loadgen.pid)

    def _keep_logs(self) -> None:
        """Copy the logs of a failed run where the user looks (OUT/logs)."""
        mesh_logs = self.run_dir / "mesh" / "logs"
        for logs in (self.run_dir / "logs", mesh_logs):
            if logs.exists():
                with contextlib.suppress(OSError):
                    shutil.copytree(logs, self.config.out_path / "logs", dirs_exist_ok=True)

    # -- phase 1: ExecuteAction -------------------------------------------------
    def _execute_modes(self, mesh: Mesh, proxy: Child, loadgen: LoadGenerator) -> None:
        config = self.config
        key = mesh.signing_key()
        token = mint_token(key, subject=SUBJECT, tenant=EXEC_TENANT, roles=("operator",))
        ready_token = mint_token(key, subject=SUBJECT, tenant=READY_TENANT, roles=("operator",))
        backend = mint_service_token(key, client_id=BENCH_BACKEND, ttl_s=24 * 3600.0)
        self.progress("waiting for the gateway to route to the bench provider")
        wait_gateway_executes(mesh.address("gateway"), ready_token, backend)
        targets = {
            "direct": mesh.address("noop"),
            "bare_hop": proxy.address,
            "gateway": mesh.address("gateway"),
        }
        loaded = max(config.concurrencies)
        runs: list[dict[str, Any]] = []
        gateway_executions = 0
        lag: dict[str, Any] | None = None
        profile: dict[str, Any] | None = None
        for concurrency in config.concurrencies:
            for mode in MODES:
                spec: dict[str, Any] = {
                    "kind": "execute",
                    "mode": mode,
                    "target": targets[mode],
                    "concurrency": concurrency,
                    "warmup_s": config.warmup_s,
                    "duration_s": config.duration_s,
                    "timeout_s": config.request_timeout_s,
                    "tenant": EXEC_TENANT,
                    "subject": SUBJECT,
                    "record_type": RECORD_TYPE,
                    "action_id": ACTION_ID,
                    "token": token,
                    "extra_metadata": [list(service_metadata(backend))],
                }
                probing = mode == "gateway" and concurrency == loaded
                if probing:
                    spec["lag_probe_auditlog"] = mesh.address("auditlog")
                    spec["lag_probe_interval_s"] = config.lag_probe_interval_s
                profiler = None
                if probing and config.profile:
                    profiler = start_profiler(
                        config.profile,
                        self._pid(mesh, "gateway"),
                        config.warmup_s + config.duration_s,
                    )
                result = loadgen.run(spec)
                if profiler is not None:
                    profile = self._finish_profiler(profiler)
                if mode == "gateway":
                    gateway_executions += result["successes"] + result["warmup_successes"]
                    if "lag" in result:
                        lag = result.pop("lag")
                        gateway_executions += lag["executions_succeeded"]
                runs.append({"mode": mode, "concurrency": concurrency, **result})
                self.progress(
                    f"{mode:>8} c={concurrency:<3} {result['rps']:8.0f} req/s  "
                    f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                    f"errors {result['errors']}"
                )
        self.report["runs"] = runs
        self.report["ratios"] = ratios(runs)
        if profile is not None or config.profile:
            self.report["profile"] = profile or {
                "skipped": "py-spy not found (pip install py-spy)",
            }
        expected = 2 * gateway_executions
        self.progress(f"waiting for {expected} audit events of the gateway runs")
        count, waited = audit.wait_for_events(
            mesh.address("auditlog"), EXEC_TENANT, expected, config.audit_drain_timeout_s
        )
        self.report["audit"] = {
            "gateway_events": {
                "tenant": EXEC_TENANT,
                "executions": gateway_executions,
                "expected": expected,
                "stored": count.events,
                "lost": max(0, expected - count.events),
                "extra": max(0, count.events - expected),
                "chain_intact": count.intact,
                "drain_wait_s": round(waited, 3),
            },
            "lag": lag or {"skipped": "no loaded gateway run"},
        }

    def _finish_profiler(self, profiler: subprocess.Popen[bytes]) -> dict[str, Any]:
        try:
            _, err = profiler.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            _, err = profiler.communicate()
        output = Path(self.config.profile)
        return {
            "tool": "py-spy record --rate 200 --nonblocking",
            "process": "gateway",
            "output": str(output),
            "written": output.exists(),
            "returncode": profiler.returncode,
            "stderr": (err or b"").decode(errors="replace")[-500:],
        }

    # -- phase 2: DiscoverActions fan-out -----------------------------------------
    def _fanout(self, mesh: Mesh, loadgen: LoadGenerator) -> None:
        config = self.config
        sizes = sorted(set(config.fanout_sizes))
        largest = sizes[-1]
        per_process = -(-largest // FANOUT_PROCESSES)
        self.progress(f"starting {largest} fan-out providers + 1 hanging")
        launched: list[Launched] = []
        children: list[Child] = []
        try:
            for index in range(FANOUT_PROCESSES):
                first, last = index * per_process, min(largest, (index + 1) * per_process)
                last_process = index == FANOUT_PROCESSES - 1
                if first >= last and not last_process:
                    continue
                launched.append(
                    launch_child(
                        f"fanout-{index}",
                        "actionmesh.bench.fanout",
                        [
                            "--registry",
                            mesh.address("registry"),
                            "--sizes",
                            ",".join(str(s) for s in sizes),
                            "--first",
                            str(first),
                            "--last",
                            str(last),
                            "--hang",
                            "true" if last_process else "false",
                            "--delay-ms",
                            str(config.fanout_delay_ms),
                        ],
                        self.run_dir,
                    )
                )
            children = [process.wait_ready() for process in launched]
            key = mesh.signing_key()
            ready = mint_token(key, subject=SUBJECT, tenant=READY_TENANT, roles=("operator",))
            token = mint_token(key, subject=SUBJECT, tenant=FANOUT_TENANT, roles=("operator",))
            wait_gateway_fans_out(mesh.address("gateway"), ready, largest)
            runs: list[dict[str, Any]] = []
            discoveries = 0
            scenarios = [(str(size), record_type(size), size, False) for size in sizes]
            scenarios.append((f"{largest}+hang", HANG_RECORD_TYPE, largest, True))
            for label, kind, providers, hang in scenarios:
                result = loadgen.run(
                    {
                        "kind": "discover",
                        "target": mesh.address("gateway"),
                        "token": token,
                        "tenant": FANOUT_TENANT,
                        "record_type": kind,
                        "expected_actions": providers,
                        "concurrency": 1,
                        # The providers are warm by then; a hanging call costs a deadline.
                        "warmup_s": 0.0 if hang else config.fanout_warmup_s,
                        "duration_s": max(config.fanout_duration_s, 3 * config.discover_timeout_s)
                        if hang
                        else config.fanout_duration_s,
                        "timeout_s": config.request_timeout_s,
                    }
                )
                discoveries += result["successes"] + result["warmup_successes"]
                runs.append(
                    {"scenario": label, "providers": providers, "hanging": int(hang), **result}
                )
                self.progress(
                    f"fan-out {label:>7}: p50 {result['p50_ms']:7.1f} ms  "
                    f"p99 {result['p99_ms']:7.1f} ms  ({result['successes']} calls, "
                    f"{result['incomplete_answers']} incomplete)"
                )
            for child in children:
                self.rss[child.name] = peak_rss_mb(child.pid)
        finally:
            stop_all([process.stop for process in launched])
        self.progress(f"waiting for {discoveries} discovery audit events")
        count, waited = audit.wait_for_events(
            mesh.address("auditlog"), FANOUT_TENANT, discoveries, config.audit_drain_timeout_s
        )
        self.report["fanout"] = {
            "provider_delay_ms": config.fanout_delay_ms,
            "discover_deadline_ms": config.discover_timeout_s * 1000,
            "runs": runs,
        }
        self.report["audit"]["discovery_events"] = {
            "tenant": FANOUT_TENANT,
            "expected": discoveries,
            "stored": count.events,
            "lost": max(0, discoveries - count.events),
            "extra": max(0, count.events - discoveries),
            "chain_intact": count.intact,
            "drain_wait_s": round(waited, 3),
        }

    # -- phase 3: audit ingest ------------------------------------------------------
    def _launch_auditlogs(self) -> dict[str, Launched]:
        backends = {"sqlite": audit.sqlite_ingest_url(self.run_dir)}
        if self.config.postgres_url:
            backends["postgresql"] = self.config.postgres_url
        return {
            backend: audit.launch_auditlog(self.run_dir, backend, url)
            for backend, url in backends.items()
        }

    def _ingest(self, loadgen: LoadGenerator, auditlogs: dict[str, Launched]) -> None:
        results: dict[str, Any] = {}
        if "postgresql" not in auditlogs:
            results["postgresql"] = {"skipped": "no --postgres-url given"}
        for backend, launched in auditlogs.items():
            self.progress(f"audit ingest on {backend}")
            try:
                result = audit.ingest(self.config, loadgen, launched, backend)
            except ChildError as exc:
                if backend == "sqlite":
                    raise
                results[backend] = {"skipped": f"the audit log could not start: {exc}"[:2000]}
                continue
            self.rss[f"auditlog-{backend}"] = result.pop("peak_rss_mb")
            results[backend] = result
            self.progress(
                f"audit ingest {backend}: {result['events_per_s']:8.0f} events/s "
                f"({result['events_stored']} events, {result['errors']} errors)"
            )
        self.report["audit"]["ingest"] = dict(sorted(results.items(), reverse=True))

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _pid(mesh: Mesh, name: str) -> int:
        process = mesh.services[name].process
        if process is None:
            raise BenchError(f"{name} is not running")
        return process.pid

    def _record_rss(self, mesh: Mesh, children: list[Child], loadgen: LoadGenerator) -> None:
        for name, service in mesh.services.items():
            self.rss[name] = peak_rss_mb(service.process.pid if service.process else None)
        for child in children:
            self.rss[child.name] = peak_rss_mb(child.pid)

    def _events_lost(self) -> int:
        found = self.report.get("audit", {})
        lost = int(found.get("gateway_events", {}).get("lost", 0))
        lost += int(found.get("discovery_events", {}).get("lost", 0))
        for result in found.get("ingest", {}).values():
            lost += int(result.get("events_lost", 0))
        return lost


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """gateway/bare hop and bare hop/direct, at the lowest and the highest concurrency."""
    by_key = {(run["mode"], run["concurrency"]): run for run in runs}
    concurrencies = sorted({run["concurrency"] for run in runs})
    low, high = concurrencies[0], concurrencies[-1]

    def ratio(numerator: float, denominator: float) -> float | None:
        return numerator / denominator if denominator > 0 else None

    result: dict[str, Any] = {"low_concurrency": low, "high_concurrency": high}
    for c in sorted({low, high}):
        gateway, bare, direct = (by_key.get((m, c)) for m in ("gateway", "bare_hop", "direct"))
        if gateway is None or bare is None or direct is None:
            continue
        result[f"c{c}"] = {
            "gateway_p50_over_bare_hop_p50": ratio(gateway["p50_ms"], bare["p50_ms"]),
            "gateway_p99_over_bare_hop_p99": ratio(gateway["p99_ms"], bare["p99_ms"]),
            "gateway_rps_over_bare_hop_rps": ratio(gateway["rps"], bare["rps"]),
            "bare_hop_p50_over_direct_p50": ratio(bare["p50_ms"], direct["p50_ms"]),
            "bare_hop_rps_over_direct_rps": ratio(bare["rps"], direct["rps"]),
            "gateway_added_p50_ms": gateway["p50_ms"] - bare["p50_ms"],
        }
    return result


def stop_all(stops: list[Callable[[], None]]) -> None:
    """Run blocking stop functions side by side (each bounded by its own grace)."""
    with ThreadPoolExecutor(max_workers=max(1, len(stops))) as pool:
        for future in [pool.submit(stop) for stop in stops]:
            future.result()


def run_bench(config: BenchConfig, progress: Progress) -> dict[str, Any]:
    """Run the benchmark described by ``config``; the report as a JSON-ready dict."""
    return Bench(config, progress).run()
