"""One benchmark run, end to end: start what it needs, measure, stop everything.

Phases, in order, all on 127.0.0.1 under a temporary directory:

1. a mesh (registry, audit log, gateway, the bench provider) started by
   :class:`actionmesh.mesh.Mesh`, plus the pass-through proxy in front of the
   same provider; ExecuteAction direct, through the proxy and through the gateway
   at each concurrency, the end-to-end audit lag probed during the loaded gateway
   run, then the audit count check (2 events per successful execution). The
   gateway runs act on a record type whose system of record is the bench provider
   (one ResolveRecord per execution); ``gateway_trusted`` runs the same on a type
   without a source, its facts vouched for by the bench's backend identity (a
   trusted caller): the difference is what resolving facts costs;
2. fact resolution at discovery: DiscoverActions (concurrency 1, caches warm) on
   the trusted type and on the sourced type, on the mesh's gateway (record facts
   cached for ``facts_cache_ttl_s``) and on a second gateway that never caches
   them (``record_facts_cache_ttl_s=0``; started with the proxy, idle until
   then, stopped after); the discovery audit events counted;
3. fan-out providers registered in the same mesh; DiscoverActions over 1, 8, 32
   providers and with one hanging; the discovery audit events counted;
4. the mesh stopped; AppendEvents ingest on SQLite, then PostgreSQL if given.

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
from actionmesh.bench.noop import ACTION_ID, PROVIDER_ID, RECORD_TYPE, TRUSTED_RECORD_TYPE
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

MODES = ("direct", "bare_hop", "gateway", "gateway_trusted")
# Measured in turns (see loadgen.run_alternate): their difference is the cost of resolution.
GATEWAY_MODES = ("gateway", "gateway_trusted")
EXEC_TENANT = "bench-exec"
FANOUT_TENANT = "bench-fanout"
FACTS_TENANT = "bench-facts"
# The bench's backend identity, which the gateway trusts for TRUSTED_RECORD_TYPE's facts.
TRUSTED_CALLER = "bench-backend"
# The second gateway of the discovery runs: record facts never cached.
NOCACHE_GATEWAY = "gateway-nocache"
# Readiness probes run in a tenant of their own, so they never enter the counts.
READY_TENANT = "bench-ready"
SUBJECT = "bench"
FANOUT_PROCESSES = 2
READY_TIMEOUT_S = 60.0
# High enough that the admission check is measured without refusing anything.
BENCH_TENANT_RATE = "1000000/second"

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


def wait_gateway_executes(address: str, token: str) -> None:
    """Until the gateway's directory has the bench provider SERVING (an execution succeeds)."""
    channel, stub = _gateway_stub(address)
    metadata = (("authorization", f"Bearer {token}"),)
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


def wait_gateway_resolves(address: str, token: str) -> None:
    """Until the gateway discovers the bench action on facts its record source vouched for."""
    channel, stub = _gateway_stub(address)
    metadata = (("authorization", f"Bearer {token}"),)

    def resolves() -> bool:
        reply = stub.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(
                record=_ready_record(RECORD_TYPE, "ready"), skip_cache=True
            ),
            metadata=metadata,
            timeout=5.0,
        )
        return (
            len(reply.actions) == 1
            and reply.facts.source == common_pb2.FACT_SOURCE_PROVIDER
            and reply.facts.vouched_by == PROVIDER_ID
        )

    with channel:
        _until(resolves, READY_TIMEOUT_S, f"{address} did not resolve facts from its source")


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
                        # The bench's backend vouches for the facts of the type without a
                        # source (the gateway_trusted runs); benchrec's come from its source.
                        "ACTIONMESH_GATEWAY_TRUSTED_CALLERS": (
                            f"{TRUSTED_CALLER}={TRUSTED_RECORD_TYPE}"
                        ),
                        "ACTIONMESH_GATEWAY_RECORD_FACTS_CACHE_TTL_S": str(
                            self.config.facts_cache_ttl_s
                        ),
                    },
                )
            )
            stack.callback(mesh.stop)
            self.progress("starting the mesh (registry, audit log, gateway, bench provider)")
            mesh.start()
            proxy = self._start_proxy_and_second_gateway(mesh, stack)
            self._execute_modes(mesh, proxy, loadgen)
            self._facts_discover(mesh, loadgen)
            self._fanout(mesh, loadgen)
            self._record_rss(mesh, [proxy], loadgen)
            self.progress("stopping the mesh")
            stop_all([proxy.stop, *(partial(mesh.stop_service, name) for name in mesh.services)])
            self._ingest(loadgen, auditlogs)
            self.rss["loadgen"] = peak_rss_mb(loadgen.pid)

    def _start_proxy_and_second_gateway(self, mesh: Mesh, stack: contextlib.ExitStack) -> Child:
        """The pass-through proxy, and the gateway that never caches record facts (phase 2),
        started side by side to save a start-up; that gateway idles until phase 2."""
        self.progress("starting the pass-through proxy and a gateway without a facts cache")
        with ThreadPoolExecutor(max_workers=2) as pool:
            proxy_started = pool.submit(
                start_child,
                "proxy",
                "actionmesh.bench.proxy",
                ["--target", mesh.address("noop")],
                self.run_dir,
            )
            # A failed start stays in mesh.services, which mesh.stop stops.
            gateway_started = pool.submit(
                mesh.start_gateway, NOCACHE_GATEWAY, "--record-facts-cache-ttl-s", "0"
            )
        proxy = proxy_started.result()  # a proxy that failed to start was stopped
        stack.callback(proxy.stop)
        gateway_started.result()
        return proxy

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
        self.progress("waiting for the gateway to route to the bench provider")
        wait_gateway_executes(mesh.address("gateway"), ready_token)
        targets = {
            "direct": mesh.address("noop"),
            "bare_hop": proxy.address,
            "gateway": mesh.address("gateway"),
            "gateway_trusted": mesh.address("gateway"),
        }
        vouching = _vouching(mesh)
        loaded = max(config.concurrencies)
        runs: list[dict[str, Any]] = []
        gateway_executions = 0
        lag: dict[str, Any] | None = None
        profile: dict[str, Any] | None = None
        for concurrency in config.concurrencies:
            specs: dict[str, dict[str, Any]] = {}
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
                }
                if mode == "gateway_trusted":
                    # The same call on a type without a source: no ResolveRecord.
                    spec["record_type"] = TRUSTED_RECORD_TYPE
                    spec["extra_metadata"] = vouching
                if mode == "gateway" and concurrency == loaded:
                    spec["lag_probe_auditlog"] = mesh.address("auditlog")
                    spec["lag_probe_interval_s"] = config.lag_probe_interval_s
                specs[mode] = spec
            results: dict[str, dict[str, Any]] = {}
            for mode in ("direct", "bare_hop"):
                results[mode] = loadgen.run(specs[mode])
                self._said_run(mode, concurrency, results[mode])
            # With and without resolution in turns: their difference is what is measured.
            pair = {mode: specs[mode] for mode in GATEWAY_MODES}
            profiler = None
            if concurrency == loaded and config.profile:
                profiler = start_profiler(
                    config.profile,
                    self._pid(mesh, "gateway"),
                    len(pair) * (config.warmup_s + config.duration_s),
                )
            alternated = loadgen.run(
                {"kind": "alternate", "slices": config.alternate_slices, "specs": pair}
            )
            if profiler is not None:
                profile = self._finish_profiler(profiler)
            for mode in GATEWAY_MODES:
                result = results[mode] = alternated[mode]
                gateway_executions += result["successes"] + result["warmup_successes"]
                if "lag" in result:
                    lag = result.pop("lag")
                    gateway_executions += lag["executions_succeeded"]
                self._said_run(mode, concurrency, result)
            runs.extend({"mode": m, "concurrency": concurrency, **results[m]} for m in MODES)
        self.report["runs"] = runs
        self.report["ratios"] = ratios(runs)
        self.report["facts"] = {
            "source": {"record_type": RECORD_TYPE, "provider": PROVIDER_ID},
            "trusted": {"record_type": TRUSTED_RECORD_TYPE, "caller": TRUSTED_CALLER},
            "cache_ttl_s": config.facts_cache_ttl_s,
            "execute": execute_resolution(runs),
        }
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

    def _said_run(self, mode: str, concurrency: int, result: dict[str, Any]) -> None:
        self.progress(
            f"{mode:>15} c={concurrency:<3} {result['rps']:8.0f} req/s  "
            f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
            f"errors {result['errors']}"
        )

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

    # -- phase 2: fact resolution at discovery ------------------------------------
    def _facts_discover(self, mesh: Mesh, loadgen: LoadGenerator) -> None:
        """DiscoverActions on the trusted and the sourced type, facts cached and not."""
        config = self.config
        key = mesh.signing_key()
        ready = mint_token(key, subject=SUBJECT, tenant=READY_TENANT, roles=("operator",))
        token = mint_token(key, subject=SUBJECT, tenant=FACTS_TENANT, roles=("operator",))
        try:
            wait_gateway_resolves(mesh.address(NOCACHE_GATEWAY), ready)
            gateways = (("cached", "gateway"), ("uncached", NOCACHE_GATEWAY))
            specs: dict[str, dict[str, Any]] = {}
            for facts_cache, gateway in gateways:
                for source, kind in (("trusted", TRUSTED_RECORD_TYPE), ("source", RECORD_TYPE)):
                    spec: dict[str, Any] = {
                        "kind": "discover",
                        "target": mesh.address(gateway),
                        "token": token,
                        "tenant": FACTS_TENANT,
                        "record_type": kind,
                        "expected_actions": 1,
                        # Warm caches: what a UI refresh meets. Few records, so every
                        # cache holds them all; the TTLs refresh a record now and then.
                        "skip_cache": False,
                        "records": config.facts_discover_records,
                        "concurrency": 1,
                        "warmup_s": config.facts_warmup_s,
                        "duration_s": config.facts_duration_s,
                        "timeout_s": config.request_timeout_s,
                    }
                    if source == "trusted":
                        spec["extra_metadata"] = _vouching(mesh)
                    specs[f"{source} {facts_cache}"] = spec
            # In turns, so a change of the machine's load lands on all four alike.
            alternated = loadgen.run(
                {"kind": "alternate", "slices": config.alternate_slices, "specs": specs}
            )
            runs: list[dict[str, Any]] = []
            for name, result in alternated.items():
                source, facts_cache = name.split()
                runs.append({"facts_cache": facts_cache, "facts_from": source, **result})
                self.progress(
                    f"discover {source:>7}, facts {facts_cache:>8}: "
                    f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
                    f"({result['successes']} calls)"
                )
            discoveries = sum(r["successes"] + r["warmup_successes"] for r in runs)
            self.progress(f"waiting for {discoveries} discovery audit events (facts runs)")
            count, waited = audit.wait_for_events(
                mesh.address("auditlog"), FACTS_TENANT, discoveries, config.audit_drain_timeout_s
            )
            self.rss[NOCACHE_GATEWAY] = peak_rss_mb(self._pid(mesh, NOCACHE_GATEWAY))
        finally:
            mesh.stop_service(NOCACHE_GATEWAY)
        self.report["facts"]["discover"] = {
            "concurrency": 1,
            "skip_cache": False,
            "records": config.facts_discover_records,
            "runs": runs,
            **discover_resolution(runs),
        }
        self.report["audit"]["facts_discovery_events"] = {
            "tenant": FACTS_TENANT,
            "expected": discoveries,
            "stored": count.events,
            "lost": max(0, discoveries - count.events),
            "extra": max(0, count.events - discoveries),
            "chain_intact": count.intact,
            "drain_wait_s": round(waited, 3),
        }

    # -- phase 3: DiscoverActions fan-out -----------------------------------------
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

    # -- phase 4: audit ingest ------------------------------------------------------
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
            process = service.process
            if name in self.rss and (process is None or process.poll() is not None):
                continue  # stopped earlier, its peak read before it stopped
            self.rss[name] = peak_rss_mb(process.pid if process else None)
        for child in children:
            self.rss[child.name] = peak_rss_mb(child.pid)

    def _events_lost(self) -> int:
        found = self.report.get("audit", {})
        lost = int(found.get("gateway_events", {}).get("lost", 0))
        lost += int(found.get("discovery_events", {}).get("lost", 0))
        lost += int(found.get("facts_discovery_events", {}).get("lost", 0))
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


def _vouching(mesh: Mesh) -> list[list[str]]:
    """The bench backend's own token, as the metadata a trusted caller adds to its calls."""
    token = mint_service_token(mesh.signing_key(), client_id=TRUSTED_CALLER, ttl_s=86400.0)
    return [[SERVICE_METADATA, f"Bearer {token}"]]


def _difference(with_source: dict[str, Any], trusted: dict[str, Any]) -> dict[str, Any]:
    """What the source adds over the trusted caller: signed differences (noise can make
    a cost too small to measure come out negative) and ratios."""

    def ratio(numerator: float, denominator: float) -> float | None:
        return numerator / denominator if denominator > 0 else None

    return {
        "trusted_p50_ms": trusted["p50_ms"],
        "source_p50_ms": with_source["p50_ms"],
        "source_added_p50_ms": with_source["p50_ms"] - trusted["p50_ms"],
        "source_added_mean_ms": with_source["mean_ms"] - trusted["mean_ms"],
        "source_p50_over_trusted_p50": ratio(with_source["p50_ms"], trusted["p50_ms"]),
        "source_rps_over_trusted_rps": ratio(with_source["rps"], trusted["rps"]),
    }


def execute_resolution(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: gateway (fresh ResolveRecord per call) vs gateway_trusted (none)."""
    by_key = {(run["mode"], run["concurrency"]): run for run in runs}
    result: dict[str, Any] = {}
    for c in sorted({run["concurrency"] for run in runs}):
        with_source, trusted = by_key.get(("gateway", c)), by_key.get(("gateway_trusted", c))
        if with_source is not None and trusted is not None:
            result[f"c{c}"] = _difference(with_source, trusted)
    return result


def discover_resolution(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per facts cache (cached, uncached): the sourced type's discovery vs the trusted
    type's on the same gateway; and what the cache saves (uncached minus cached cost)."""
    by_key = {(run["facts_cache"], run["facts_from"]): run for run in runs}
    result: dict[str, Any] = {}
    for cache in ("cached", "uncached"):
        with_source, trusted = by_key.get((cache, "source")), by_key.get((cache, "trusted"))
        if with_source is not None and trusted is not None:
            result[cache] = _difference(with_source, trusted)
    if "cached" in result and "uncached" in result:
        result["cache_saves_p50_ms"] = (
            result["uncached"]["source_added_p50_ms"] - result["cached"]["source_added_p50_ms"]
        )
    return result


def stop_all(stops: list[Callable[[], None]]) -> None:
    """Run blocking stop functions side by side (each bounded by its own grace)."""
    with ThreadPoolExecutor(max_workers=max(1, len(stops))) as pool:
        for future in [pool.submit(stop) for stop in stops]:
            future.result()


def run_bench(config: BenchConfig, progress: Progress) -> dict[str, Any]:
    """Run the benchmark described by ``config``; the report as a JSON-ready dict."""
    return Bench(config, progress).run()
