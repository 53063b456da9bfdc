"""The scripted fault suite: one fault per test, injected while a bounded load runs.

Every service is a real process of the test's own mesh; two providers (``alpha``,
the victim, and ``beta``, a bystander) run tests/fault_provider.py, which journals
every handler invocation to disk. The load driver sends ExecuteAction through the
gateway at a fixed rate with a bounded number of callers, each call with a
deadline and its own idempotency key (plus deliberate repeats of earlier keys).

After each fault the same invariants are checked:

- every call completed or got a categorized outcome/status (never UNKNOWN or
  INTERNAL); the histogram is printed;
- no call took longer than its deadline plus a small slack;
- no idempotency key reached a provider's handler twice (the journals);
- every execution's audit events reached the audit log: one STARTED, its
  FINISHED events ending in the outcome the gateway stored, a LATE_RESULT or an
  EXECUTION_RECONCILED exactly when a resolved outcome was recorded (plus one
  reconciliation per earlier run found never received), and each refusal as one
  FINISHED event (counted per key from the audit log's database, against the
  gateway's own store).

Run alone with ``pytest -m faults``; the whole file stays well under four minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.auditlog.storage import AuditRepository
from actionmesh.gateway.auth import mint_token
from actionmesh.gateway.model import ExecutionRecord
from actionmesh.gateway.storage import GatewayStore
from actionmesh.mesh import Mesh, MeshSettings, tail
from actionmesh.rpc.errors import error_details
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TEST_MESH, bearer, eventually, vouching_channel
from tests.fault_provider import (
    JOURNAL_ENV,
    PROVIDER_ID_ENV,
    RECORD_TYPE,
    SLEEP_MS_ENV,
    TIMEOUT_S_ENV,
    read_journal,
)
from tests.test_audit_faults import outbox_depth, verify_chain

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

MODULE = "tests.fault_provider"
VICTIM, BYSTANDER = "alpha", "beta"
# Each call's deadline, and how much later than that a call may end (scheduling, 2 cores).
DEADLINE_S = 5.0
SLACK_S = 1.0
# The fault providers' action timeout: a hung provider gives TIMED_OUT after this.
ACTION_TIMEOUT_S = 2.0
# How old a fault provider's claim on a key grows before it counts as abandoned.
STALE_CLAIM_S = 4.0
# Every fourth call repeats the key of the call two before it (same provider, same record).
REPEAT_EVERY = 4
NEVER = {"UNKNOWN", "INTERNAL"}
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
RECONCILED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_RECONCILED
LATE = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_LATE_RESULT
# A client channel that finds a restarted gateway quickly (the default backoff grows to 2 min).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# -- the mesh -------------------------------------------------------------------


def start_fault_mesh(data_dir: Path, **settings: object) -> Mesh:
    """Registry, audit log, gateway and the two fault providers, as processes."""
    merged = {
        **TEST_MESH,
        "provider_modules": (),
        # Long leases: a hung or restarting provider stays registered (reported unhealthy),
        # so what the tests see is health checking, deregistration and resync, not expiry.
        "lease_ttl_s": 30.0,
        # Reconciliation (and the orphan sweep feeding it) at a test's pace, so what a
        # fault left unsettled is settled within the suite's bounds.
        "extra_env": {
            **TEST_MESH["extra_env"],  # type: ignore[dict-item]
            "ACTIONMESH_GATEWAY_RECONCILE_INTERVAL_S": "0.5",
            "ACTIONMESH_GATEWAY_RECONCILE_MAX_BACKOFF_S": "2",
            "ACTIONMESH_GATEWAY_APPROVAL_SWEEP_INTERVAL_S": "1",
        },
        **settings,
    }
    mesh = Mesh(MeshSettings(data_dir=data_dir, **merged))  # type: ignore[arg-type]
    try:
        mesh.start()
        for provider in (VICTIM, BYSTANDER):
            start_fault_provider(mesh, provider)
    except BaseException:
        stop_fault_mesh(mesh)
        raise
    return mesh


def stop_fault_mesh(mesh: Mesh) -> None:
    # A stopped process cannot act on SIGTERM; wake it so the mesh stops cleanly.
    for service in mesh.services.values():
        if service.process is not None and service.process.poll() is None:
            service.process.send_signal(signal.SIGCONT)
    mesh.stop()
    for service in mesh.services.values():  # shown only when the test failed
        print(f"--- {service.name} log ---\n{tail(service.log_path, 30)}")


@pytest.fixture
def fault_mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = start_fault_mesh(tmp_path / "mesh")
    try:
        yield mesh
    finally:
        stop_fault_mesh(mesh)


def journal_path(mesh: Mesh, provider: str) -> Path:
    return mesh.data_dir / "data" / f"{provider}-journal.jsonl"


def start_fault_provider(
    mesh: Mesh, provider: str, *, sleep_ms: int = 50, timeout_s: float = ACTION_TIMEOUT_S
) -> None:
    mesh.start_provider(
        MODULE,
        name=provider,
        env={
            PROVIDER_ID_ENV: provider,
            JOURNAL_ENV: str(journal_path(mesh, provider)),
            SLEEP_MS_ENV: str(sleep_ms),
            # Handlers here take at most 1.5 s: a claim older than this was abandoned by
            # a killed process, so the provider can tell the reconciler so while the suite
            # runs (the default waits five minutes).
            "ACTIONMESH_PROVIDER_DEDUPE_STALE_CLAIM_S": str(STALE_CLAIM_S),
            TIMEOUT_S_ENV: str(timeout_s),
        },
    )


def operator_token(mesh: Mesh) -> str:
    return mint_token(mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"])


def record(record_id: str) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(tenant="acme", type=RECORD_TYPE, id=record_id, status="open")


# -- the load driver ------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    key: str
    provider: str
    repeat: bool = False
    sleep_ms: int = 0  # 0: the provider's default

    @property
    def record_id(self) -> str:
        # One record per key: its timeline holds exactly this key's evidence.
        return f"r-{self.key}"


@dataclass(frozen=True)
class Call:
    """What one ExecuteAction call ended with, as its caller saw it."""

    planned: Planned
    elapsed_s: float
    code: str  # "OK" or the gRPC status code name
    outcome: str = ""  # the execution's outcome, for OK
    reason: str = ""  # ErrorInfo reason (or the execution's reason)
    execution_id: str = ""

    @property
    def category(self) -> str:
        if self.code == "OK":
            return f"OK/{self.outcome}"
        return f"{self.code}/{self.reason or 'no-details'}"


def plan(total: int, providers: Sequence[str], sleep_ms: int = 0) -> list[Planned]:
    """``total`` calls over the providers in turn; every REPEAT_EVERY-th repeats a key."""
    planned: list[Planned] = []
    for i in range(total):
        if i % REPEAT_EVERY == REPEAT_EVERY - 1:
            earlier = planned[i - len(providers)]
            planned.append(Planned(earlier.key, earlier.provider, True, earlier.sleep_ms))
        else:
            planned.append(
                Planned(uuid.uuid4().hex, providers[i % len(providers)], False, sleep_ms)
            )
    return planned


async def execute(
    gateway: gateway_pb2_grpc.ActionGatewayServiceStub, token: str, item: Planned
) -> Call:
    request = gateway_pb2.ExecuteActionRequest(
        action_id=f"{item.provider}.touch",
        record=record(item.record_id),
        inputs={"sleep_ms": common_pb2.InputValue(integer_value=item.sleep_ms)}
        if item.sleep_ms
        else {},
        idempotency_key=item.key,
    )
    started = time.monotonic()
    try:
        reply = await gateway.ExecuteAction(request, metadata=bearer(token), timeout=DEADLINE_S)
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        return Call(
            item,
            time.monotonic() - started,
            exc.code().name,
            reason=details.reason,
            execution_id=details.metadata.get("execution_id", ""),
        )
    execution = reply.execution
    return Call(
        item,
        time.monotonic() - started,
        "OK",
        outcome=common_pb2.Outcome.Name(execution.outcome).removeprefix("OUTCOME_"),
        reason=execution.reason,
        execution_id=execution.execution_id,
    )


class Load:
    """A fixed number of calls started at a fixed rate, at most ``callers`` at a time."""

    def __init__(
        self,
        mesh: Mesh,
        planned: list[Planned],
        *,
        rate_per_s: float,
        callers: int = 6,
    ) -> None:
        self.mesh = mesh
        self.planned = planned
        self.rate_per_s = rate_per_s
        self.callers = callers
        self.calls: list[Call] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        token = operator_token(self.mesh)
        limit = asyncio.Semaphore(self.callers)
        async with vouching_channel(self.mesh, options=CHANNEL_OPTIONS) as channel:
            gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

            async def one(item: Planned) -> None:
                async with limit:
                    self.calls.append(await execute(gateway, token, item))

            began = time.monotonic()
            tasks = []
            for i, item in enumerate(self.planned):
                await asyncio.sleep(max(0.0, began + i / self.rate_per_s - time.monotonic()))
                tasks.append(asyncio.create_task(one(item)))
            await asyncio.gather(*tasks)

    async def reached(self, done: int) -> None:
        def progressed() -> bool:
            assert self._task is not None
            if self._task.done():
                self._task.result()  # a broken driver fails the test here, not in 30 s
            return len(self.calls) >= done

        await eventually(progressed, timeout_s=30)

    async def finish(self) -> list[Call]:
        assert self._task is not None
        # Bounded: every call has a deadline, so the load ends soon after its last start.
        await asyncio.wait_for(self._task, len(self.planned) / self.rate_per_s + 2 * DEADLINE_S)
        return self.calls


async def retry_unfinished(mesh: Mesh, calls: list[Call]) -> list[Call]:
    """Send once more, with the same key, every key that did not end with an outcome."""
    final = {c.planned.key for c in calls if c.code == "OK"}
    again = {c.planned.key: c.planned for c in calls if c.planned.key not in final}
    token = operator_token(mesh)
    async with vouching_channel(mesh, options=CHANNEL_OPTIONS) as ch:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(ch)
        limit = asyncio.Semaphore(6)

        async def one(item: Planned) -> Call:
            async with limit:
                return await execute(
                    gateway, token, Planned(item.key, item.provider, True, item.sleep_ms)
                )

        return list(await asyncio.gather(*(one(p) for p in again.values())))


# -- the invariants -------------------------------------------------------------


def histogram(calls: Sequence[Call]) -> Counter[str]:
    counts = Counter(f"{c.planned.provider} {c.category}" for c in calls)
    print("outcome histogram:", dict(sorted(counts.items())))
    return counts


def assert_categorized_and_bounded(calls: Sequence[Call]) -> None:
    """Every call ended with an outcome or a status a caller can act on, within its deadline."""
    histogram(calls)
    assert calls
    for call in calls:
        assert call.code not in NEVER, call
        if call.code == "OK":
            assert call.outcome not in ("", "UNSPECIFIED", "RUNNING"), call
        assert call.elapsed_s <= DEADLINE_S + SLACK_S, call


def assert_no_key_ran_twice(mesh: Mesh, providers: Sequence[str] = (VICTIM, BYSTANDER)) -> None:
    """No key reached a handler twice, except after the process running it was killed
    mid-handler: its claim is then abandoned and the key runs again (once) in the next
    process, as the SDK documents (handlers re-check their own state)."""
    for provider in providers:
        entries = read_journal(journal_path(mesh, provider))
        live = {e["pid"] for e in entries if pid_alive(e["pid"])}
        runs: dict[str, list[int]] = defaultdict(list)
        for entry in entries:
            runs[entry["key"]].append(entry["pid"])
        twice = {
            key: pids
            for key, pids in runs.items()
            if len(pids) > 1
            and (len(set(pids)) != len(pids) or any(pid in live for pid in pids[:-1]))
        }
        assert not twice, f"{provider} ran these keys more than once: {twice}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gateway_executions(mesh: Mesh, keys: set[str]) -> dict[str, ExecutionRecord]:
    """The gateway's own record of each key's execution (none for a refused attempt)."""
    store = GatewayStore(sqlite_url(mesh.data_dir / "data" / "gateway.db"))
    try:
        found = {key: store.find_by_key("acme", key) for key in keys}
    finally:
        store.close()
    return {key: execution for key, execution in found.items() if execution is not None}


def stored_events(mesh: Mesh, calls: Sequence[Call]) -> dict[str, list[audit_pb2.AuditEvent]]:
    """What the audit log stored per key (each key has a record of its own)."""
    repository = AuditRepository(make_engine(sqlite_url(mesh.data_dir / "data" / "audit.db")))
    try:
        return {
            c.planned.key: repository.timeline("acme", RECORD_TYPE, c.planned.record_id, limit=500)
            for c in calls
        }
    finally:
        repository.close()


def audit_problems(mesh: Mesh, calls: Sequence[Call], *, allow_running: bool = False) -> list[str]:
    """Where the audit log disagrees with the gateway's executions and the callers' answers."""
    by_key: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        by_key[call.planned.key].append(call)
    executions = gateway_executions(mesh, set(by_key))
    events_by_key = stored_events(mesh, calls)
    problems: list[str] = []
    for key, key_calls in by_key.items():
        events = events_by_key[key]
        if len({e.event_id for e in events}) != len(events):
            problems.append(f"{key}: an event stored twice")
        if any(e.idempotency_key != key for e in events):
            problems.append(f"{key}: an event of another key on its record")
        execution = executions.get(key)
        mine = [e for e in events if execution and e.execution_id == execution.execution_id]
        refusals = [e for e in events if e not in mine]
        # Refused before any execution existed (provider unhealthy): one FINISHED each.
        if any(e.type != FINISHED or e.outcome == common_pb2.OUTCOME_SUCCEEDED for e in refusals):
            problems.append(f"{key}: unexpected events outside its execution: {refusals}")
        known_refusals = sum(
            1
            for c in key_calls
            if c.code == "UNAVAILABLE" and c.reason == "PROVIDER_UNAVAILABLE" and not c.execution_id
        )
        # Calls whose gateway answer never reached the caller may have been refused too.
        unknown = sum(1 for c in key_calls if c.code != "OK" and not c.reason)
        if not known_refusals <= len(refusals) <= known_refusals + unknown:
            problems.append(
                f"{key}: {len(refusals)} refusal events for {known_refusals} refusals seen"
            )
        if execution is None:
            if any(c.execution_id for c in key_calls):
                problems.append(f"{key}: callers saw an execution the gateway does not have")
            continue
        kinds = Counter(e.type for e in mine)
        if kinds[STARTED] != 1:
            problems.append(f"{key}: {kinds[STARTED]} STARTED events")
        finished = [e for e in mine if e.type == FINISHED]
        if not execution.finished:
            if not allow_running:
                problems.append(f"{key}: execution {execution.execution_id} never finished")
            if finished:
                problems.append(f"{key}: FINISHED events for a running execution")
            continue
        final = f"OUTCOME_{execution.outcome}"
        if not finished or common_pb2.Outcome.Name(finished[-1].outcome) != final:
            problems.append(f"{key}: last FINISHED is not {final}: {finished}")
        # Earlier FINISHED events are dispatches that found the provider down, or whose
        # outcome the reconciler found never received (nothing ran), then re-run.
        never_received = [
            e for e in mine if e.type == RECONCILED and e.outcome == common_pb2.OUTCOME_UNAVAILABLE
        ]
        rerun_after_unsettled = sum(
            1 for e in finished[:-1] if e.outcome != common_pb2.OUTCOME_UNAVAILABLE
        )
        current_never_received = execution.late_outcome == "UNAVAILABLE"
        if rerun_after_unsettled != len(never_received) - (1 if current_never_received else 0):
            problems.append(f"{key}: more than one final FINISHED event")
        if len(finished) > len(key_calls):
            problems.append(f"{key}: {len(finished)} FINISHED events for {len(key_calls)} calls")
        resolutions = kinds[LATE] + kinds[RECONCILED] - rerun_after_unsettled
        if resolutions != (1 if execution.late_outcome else 0):
            problems.append(
                f"{key}: {kinds[LATE]} LATE_RESULT and {kinds[RECONCILED]} RECONCILED events"
            )
        for call in key_calls:
            if call.execution_id and call.execution_id != execution.execution_id:
                problems.append(f"{key}: a caller saw another execution id")
            if call.code == "OK" and call.outcome not in (execution.outcome, "UNAVAILABLE"):
                problems.append(f"{key}: a caller saw {call.outcome}, stored {execution.outcome}")
    return problems


def assert_acted_once_per_success(mesh: Mesh, calls: Sequence[Call]) -> None:
    """A SUCCEEDED execution is one journal line, carrying that execution's id."""
    journals = {
        provider: {e["key"]: e for e in read_journal(journal_path(mesh, provider))}
        for provider in {c.planned.provider for c in calls}
    }
    for call in calls:
        if call.code == "OK" and call.outcome == "SUCCEEDED":
            entry = journals[call.planned.provider].get(call.planned.key)
            assert entry is not None, f"SUCCEEDED but the provider never ran it: {call}"
            assert entry["execution_id"] == call.execution_id, call


async def assert_audit_complete(
    mesh: Mesh, calls: Sequence[Call], *, allow_running: bool = False
) -> None:
    """Once the outbox is empty and late answers are in, the evidence matches, counted."""
    await eventually(lambda: outbox_depth(mesh) == 0, timeout_s=30)
    try:
        await eventually(
            lambda: not audit_problems(mesh, calls, allow_running=allow_running), timeout_s=20
        )
    except AssertionError:
        problems = audit_problems(mesh, calls, allow_running=allow_running)
        pytest.fail("audit evidence incomplete:\n" + "\n".join(problems[:20]))
    chain = await verify_chain(mesh)
    assert chain.intact
    await assert_nothing_unresolved(mesh)


UNRESOLVED = ("executions", "--unresolved", "--json")


async def assert_nothing_unresolved(mesh: Mesh) -> None:
    """Once the fault has healed, no execution's outcome is left unknown: what
    `actionmesh executions --unresolved` shows is empty (its exit code 0)."""

    async def unresolved() -> list[gateway_pb2.Execution]:
        async with vouching_channel(mesh, options=CHANNEL_OPTIONS) as ch:
            reply = await gateway_pb2_grpc.ActionGatewayServiceStub(ch).ListExecutions(
                gateway_pb2.ListExecutionsRequest(unresolved=True, page_size=100),
                metadata=bearer(operator_token(mesh)),
                timeout=DEADLINE_S,
            )
        return list(reply.unresolved)

    async def settled() -> bool:
        return not await unresolved()

    try:
        await eventually(settled, timeout_s=30)
    except AssertionError:
        left = [
            f"{e.execution_id} {common_pb2.Outcome.Name(e.outcome)} {e.reason} "
            f"{gateway_pb2.ReconcileState.Name(e.reconcile_state)} {e.resolved_reason}"
            for e in await unresolved()
        ]
        pytest.fail("executions left unresolved after the fault healed:\n" + "\n".join(left))
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "actionmesh.cli", "--data-dir", str(mesh.data_dir), *UNRESOLVED],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ACTIONMESH_TOKEN": operator_token(mesh)},
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert json.loads(shown.stdout) == [], shown.stdout


def assert_invariants(mesh: Mesh, calls: Sequence[Call]) -> None:
    assert_categorized_and_bounded(calls)
    assert_no_key_ran_twice(mesh)
    assert_acted_once_per_success(mesh, calls)


async def discover(mesh: Mesh) -> tuple[gateway_pb2.DiscoverActionsResponse, float]:
    async with vouching_channel(mesh, options=CHANNEL_OPTIONS) as ch:
        started = time.monotonic()
        reply = await gateway_pb2_grpc.ActionGatewayServiceStub(ch).DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=record("discovery-probe"), skip_cache=True),
            metadata=bearer(operator_token(mesh)),
            timeout=DEADLINE_S,
        )
        return reply, time.monotonic() - started


def offered(reply: gateway_pb2.DiscoverActionsResponse) -> set[str]:
    return {a.provider_id for a in reply.actions}


# -- the faults -----------------------------------------------------------------


async def test_provider_killed_mid_load_then_restarted(fault_mesh: Mesh) -> None:
    # Handlers of 300 ms: the kill lands while some are running.
    load = Load(fault_mesh, plan(90, (VICTIM, BYSTANDER), sleep_ms=300), rate_per_s=15)
    load.start()
    await load.reached(25)
    fault_mesh.stop_service(VICTIM, kill=True)
    await asyncio.sleep(1.5)
    fault_mesh.restart_service(VICTIM)
    calls = await load.finish()

    during = [c for c in calls if c.planned.provider == VICTIM]
    assert any(c.code == "UNAVAILABLE" for c in during), histogram(calls)
    for call in during:
        assert call.category in (
            "OK/SUCCEEDED",
            "UNAVAILABLE/PROVIDER_UNAVAILABLE",
            # In flight when the process died: the provider may have acted.
            "OK/TIMED_OUT",
            # The key's handler was running when the process died; the provider's
            # persistent dedupe refuses to run it again until its claim goes stale.
            "UNAVAILABLE/EXECUTION_IN_PROGRESS",
        ), call
        if call.category == "OK/TIMED_OUT":
            assert call.reason == "PROVIDER_CONNECTION_LOST", call
    assert all(c.category == "OK/SUCCEEDED" for c in calls if c.planned.provider == BYSTANDER)
    # Once restarted, the provider serves again: retried keys complete or stay refused
    # (EXECUTION_IN_PROGRESS: killed mid-handler), and none runs twice.
    probes = await until_served(fault_mesh, VICTIM)
    retried = await retry_unfinished(fault_mesh, calls)
    assert any(c.category == "OK/SUCCEEDED" for c in retried), histogram(retried)
    everything = calls + probes + retried
    # The outcome vocabulary says UNAVAILABLE means "nothing ran": the journal must agree
    # (a handler cut off mid-call is TIMED_OUT PROVIDER_CONNECTION_LOST instead).
    ran = {e["key"] for e in read_journal(journal_path(fault_mesh, VICTIM))}
    final = gateway_executions(fault_mesh, {c.planned.key for c in everything})
    started_but_unavailable = [
        k for k, e in final.items() if e.outcome == "UNAVAILABLE" and k in ran
    ]
    assert not started_but_unavailable, "UNAVAILABLE claims nothing ran, but the handler had"
    assert_invariants(fault_mesh, everything)
    await assert_audit_complete(fault_mesh, everything)


async def test_provider_killed_mid_handler_is_not_reported_as_nothing_ran(
    fault_mesh: Mesh,
) -> None:
    item = Planned(uuid.uuid4().hex, VICTIM, sleep_ms=1500)
    call = asyncio.create_task(execute_once(fault_mesh, item))

    def handler_started() -> bool:
        return any(e["key"] == item.key for e in read_journal(journal_path(fault_mesh, VICTIM)))

    await eventually(handler_started, timeout_s=5)
    fault_mesh.stop_service(VICTIM, kill=True)
    result = await call
    assert_categorized_and_bounded([result])
    # The handler had acted (its journal line is on disk): "may or may not have acted".
    assert result.category in ("OK/TIMED_OUT", "OK/PARTIAL"), result


async def test_hung_provider_times_out_and_the_rest_still_answers(fault_mesh: Mesh) -> None:
    load = Load(fault_mesh, plan(80, (VICTIM, BYSTANDER)), rate_per_s=12)
    load.start()
    await load.reached(20)
    fault_mesh.signal_service(VICTIM, signal.SIGSTOP)
    try:
        await asyncio.sleep(ACTION_TIMEOUT_S + 1.0)
        reply, took = await discover(fault_mesh)
        # Discovery answers within its deadline, the hung provider named as degraded.
        assert took < 0.5 + SLACK_S, took
        assert [d.provider_id for d in reply.degraded_providers] == [VICTIM], reply
        assert offered(reply) == {BYSTANDER}
        await asyncio.sleep(1.5)
    finally:
        fault_mesh.signal_service(VICTIM, signal.SIGCONT)
    calls = await load.finish()

    victim = [c for c in calls if c.planned.provider == VICTIM]
    timed_out = [c for c in victim if c.category == "OK/TIMED_OUT"]
    assert timed_out, histogram(calls)
    # TIMED_OUT comes at the action's deadline (a repeat of the key may wait for it too).
    assert all(c.elapsed_s <= ACTION_TIMEOUT_S + SLACK_S for c in timed_out if not c.planned.repeat)
    for call in victim:
        assert call.category in (
            "OK/SUCCEEDED",
            "OK/TIMED_OUT",
            "UNAVAILABLE/PROVIDER_UNAVAILABLE",
        ), call
    bystander = [c for c in calls if c.planned.provider == BYSTANDER]
    assert all(c.category == "OK/SUCCEEDED" for c in bystander), histogram(bystander)
    assert max(c.elapsed_s for c in bystander) < 1.5
    assert_invariants(fault_mesh, calls)
    # The hung handlers answer once woken: their late results are part of the evidence.
    await assert_audit_complete(fault_mesh, calls)


async def test_registry_restart_serves_from_last_view_then_resyncs(fault_mesh: Mesh) -> None:
    load = Load(fault_mesh, plan(90, (VICTIM, BYSTANDER)), rate_per_s=15)
    load.start()
    await load.reached(20)
    fault_mesh.stop_service("registry", kill=True)
    await asyncio.sleep(1.0)
    reply, took = await discover(fault_mesh)
    assert offered(reply) == {VICTIM, BYSTANDER} and not reply.degraded_providers, reply
    assert took < 0.5 + SLACK_S
    await asyncio.sleep(1.0)
    fault_mesh.restart_service("registry")
    calls = await load.finish()
    # The registry is not on the execution path: nothing failed while it was away.
    assert all(c.category == "OK/SUCCEEDED" for c in calls), histogram(calls)

    # A provider registered after the restart reaches the gateway's view (resync).
    start_fault_provider(fault_mesh, "gamma")

    async def gamma_offered() -> bool:
        return "gamma" in offered((await discover(fault_mesh))[0])

    await eventually(gamma_offered, timeout_s=20)
    gamma_calls = await until_served(fault_mesh, "gamma", timeout_s=5)
    reply, _ = await discover(fault_mesh)
    assert offered(reply) == {VICTIM, BYSTANDER, "gamma"}, reply
    everything = calls + gamma_calls
    assert_invariants(fault_mesh, everything)
    assert_no_key_ran_twice(fault_mesh, ("gamma",))
    await assert_audit_complete(fault_mesh, everything)


async def execute_once(mesh: Mesh, item: Planned) -> Call:
    async with vouching_channel(mesh, options=CHANNEL_OPTIONS) as ch:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(ch)
        return await execute(gateway, operator_token(mesh), item)


async def until_served(mesh: Mesh, provider: str, timeout_s: float = 20.0) -> list[Call]:
    """Fresh keys, one at a time, until one SUCCEEDS on ``provider``; every call made."""
    probes: list[Call] = []

    async def served() -> bool:
        probes.append(await execute_once(mesh, Planned(uuid.uuid4().hex, provider)))
        return probes[-1].category == "OK/SUCCEEDED"

    await eventually(served, timeout_s=timeout_s)
    return probes


async def test_audit_log_down_for_ten_seconds_under_load(fault_mesh: Mesh) -> None:
    load = Load(fault_mesh, plan(150, (VICTIM, BYSTANDER)), rate_per_s=10)
    load.start()
    await load.reached(15)
    fault_mesh.stop_service("auditlog")
    down_at = len(load.calls)
    await asyncio.sleep(10.0)
    answered_while_down = len(load.calls) - down_at
    fault_mesh.restart_service("auditlog")
    calls = await load.finish()

    # Executions do not wait for the audit log: they kept answering, and quickly.
    assert answered_while_down >= 60, answered_while_down
    assert all(c.category == "OK/SUCCEEDED" for c in calls), histogram(calls)
    assert max(c.elapsed_s for c in calls) < 2.0
    assert_invariants(fault_mesh, calls)
    await assert_audit_complete(fault_mesh, calls)


async def gateway_sigkill_under_load(mesh: Mesh) -> tuple[list[Call], list[Call]]:
    """SIGKILL the gateway with executions in flight, restart it, retry what had no answer."""
    # Slower handlers: more executions are in flight when the gateway dies.
    load = Load(mesh, plan(70, (VICTIM, BYSTANDER), sleep_ms=400), rate_per_s=14, callers=8)
    load.start()
    await load.reached(20)
    mesh.stop_service("gateway", kill=True)
    await asyncio.sleep(1.0)
    mesh.restart_service("gateway")
    calls = await load.finish()
    # The restarted gateway's view of the providers, before the retries.
    await eventually(lambda: mesh_offers(mesh), timeout_s=20)
    retried = await retry_unfinished(mesh, calls)
    return calls, retried


async def mesh_offers(mesh: Mesh) -> bool:
    """The gateway answers and offers both providers (False while it is still starting)."""
    try:
        return offered((await discover(mesh))[0]) == {VICTIM, BYSTANDER}
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False


async def test_gateway_sigkilled_under_load_then_restarted(fault_mesh: Mesh) -> None:
    calls, retried = await gateway_sigkill_under_load(fault_mesh)

    # In flight when it died, or sent while it was down: UNAVAILABLE, no hanging.
    lost = [c for c in calls if c.code != "OK"]
    assert lost and all(c.code == "UNAVAILABLE" for c in lost), histogram(calls)
    assert all(c.category == "OK/SUCCEEDED" for c in calls if c.code == "OK")
    everything = calls + retried
    assert_categorized_and_bounded(everything)
    # Retried keys were not executed twice; neither was anything else.
    assert_no_key_ran_twice(fault_mesh)
    assert_acted_once_per_success(fault_mesh, everything)
    # Every execution the gateway finished has all its events; the ones that were in flight
    # at the kill are checked by the next test.
    await assert_audit_complete(fault_mesh, everything, allow_running=True)


async def test_gateway_sigkill_leaves_no_execution_running(fault_mesh: Mesh) -> None:
    calls, retried = await gateway_sigkill_under_load(fault_mesh)

    # Every key retried after the restart ends with an outcome, within its deadline...
    assert all(c.code == "OK" for c in retried), histogram(retried)
    # ...and every execution has its FINISHED event.
    await assert_audit_complete(fault_mesh, calls + retried)


def test_load_plan_repeats_keys_on_the_same_provider() -> None:
    planned = plan(12, (VICTIM, BYSTANDER))
    repeats = [p for p in planned if p.repeat]
    assert len(repeats) == 3
    firsts = {p.key: p.provider for p in planned if not p.repeat}
    assert all(firsts[p.key] == p.provider for p in repeats)
    assert len(firsts) == 9
    assert list(itertools.islice((p.provider for p in planned if not p.repeat), 2)) == [
        VICTIM,
        BYSTANDER,
    ]
