"""The load generator: its own process, driven by JSON lines on stdin.

``python -m actionmesh.bench.loadgen`` reads one run spec per line and answers
each with one JSON line on stdout (see :func:`run_spec`). Keeping the client in
a process of its own means the services' CPU time and the client's are not one
event loop; keeping it alive across runs saves a Python start per run.

A run is closed-loop: ``concurrency`` workers each send the next request as
soon as the previous one answered, first for ``warmup_s`` (not measured), then
for ``duration_s``. Every request started in the measured window is awaited and
counted, as a success or as an error by gRPC status (or outcome); latencies are
those of successful requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, provider_pb2

GATEWAY_EXECUTE = "/actionmesh.v1.ActionGatewayService/ExecuteAction"
GATEWAY_DISCOVER = "/actionmesh.v1.ActionGatewayService/DiscoverActions"
PROVIDER_EXECUTE = "/actionmesh.v1.ActionProviderService/Execute"
AUDIT_APPEND = "/actionmesh.v1.AuditService/AppendEvents"
AUDIT_TIMELINE = "/actionmesh.v1.AuditService/ListTimeline"
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
# Records the load rotates over (enough to avoid one hot row, few enough to stay cached).
RECORDS = 1000
LAG_POLL_S = 0.01
LAG_GIVE_UP_S = 10.0

# One request: called with whether it is measured; returns None or an error label.
Call = Callable[[bool], Awaitable[str | None]]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    mean = sum(ordered) / len(ordered) if ordered else 0.0
    return {
        "p50_ms": percentile(ordered, 50) * 1000,
        "p90_ms": percentile(ordered, 90) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] if ordered else 0.0) * 1000,
        "mean_ms": mean * 1000,
    }


def error_label(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    return type(exc).__name__


@dataclass
class Drive:
    """What a closed-loop run observed."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    warmup_requests: int = 0
    warmup_successes: int = 0
    elapsed_s: float = 0.0

    def result(self) -> dict[str, Any]:
        successes = len(self.latencies)
        failed = sum(self.errors.values())
        return {
            "requests": successes + failed,
            "successes": successes,
            "errors": failed,
            "errors_by_code": dict(self.errors),
            "elapsed_s": self.elapsed_s,
            "rps": successes / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            **latency_summary(self.latencies),
            "warmup_requests": self.warmup_requests,
            "warmup_successes": self.warmup_successes,
        }


async def drive(call: Call, *, concurrency: int, warmup_s: float, duration_s: float) -> Drive:
    """Run ``call`` closed-loop from ``concurrency`` workers; every started request counts."""
    observed = Drive()
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    last_done = measure_from

    async def worker() -> None:
        nonlocal last_done
        while True:
            began = time.perf_counter()
            if began >= stop_at:
                return
            measured = began >= measure_from
            error = await call(measured)
            done = time.perf_counter()
            if not measured:
                observed.warmup_requests += 1
                observed.warmup_successes += error is None
                continue
            last_done = max(last_done, done)
            if error is None:
                observed.latencies.append(done - began)
            else:
                observed.errors[error] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    observed.elapsed_s = max(last_done, stop_at) - measure_from
    return observed


# -- ExecuteAction (direct, bare hop, gateway) ----------------------------------
def _record(spec: dict[str, Any], record_id: str) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(
        tenant=spec["tenant"],
        type=spec["record_type"],
        id=record_id,
        status="open",
        sensitivity=common_pb2.SENSITIVITY_NORMAL,
    )


def execute_sender(
    channel: grpc.aio.Channel, spec: dict[str, Any]
) -> Callable[[str], Awaitable[str | None]]:
    """A function sending one execution for a record id; None when it SUCCEEDED."""
    timeout = float(spec["timeout_s"])
    inputs = {"note": common_pb2.InputValue(string_value="bench")}
    if spec["mode"] == "gateway":
        gateway_call = channel.unary_unary(
            GATEWAY_EXECUTE,
            request_serializer=gateway_pb2.ExecuteActionRequest.SerializeToString,
            response_deserializer=gateway_pb2.ExecuteActionResponse.FromString,
        )
        metadata = (
            ("authorization", f"Bearer {spec['token']}"),
            # e.g. the bench backend's own token (a trusted caller vouching for the record)
            *((str(key), str(value)) for key, value in spec.get("extra_metadata", ())),
        )

        async def via_gateway(record_id: str) -> str | None:
            request = gateway_pb2.ExecuteActionRequest(
                action_id=spec["action_id"],
                record=_record(spec, record_id),
                inputs=inputs,
                idempotency_key=uuid.uuid4().hex,
            )
            try:
                response = await gateway_call(request, metadata=metadata, timeout=timeout)
            except Exception as exc:
                return error_label(exc)
            outcome = response.execution.outcome
            if outcome != common_pb2.OUTCOME_SUCCEEDED:
                return f"OUTCOME_{common_pb2.Outcome.Name(outcome).removeprefix('OUTCOME_')}"
            return None

        return via_gateway

    provider_call = channel.unary_unary(
        PROVIDER_EXECUTE,
        request_serializer=provider_pb2.ExecuteRequest.SerializeToString,
        response_deserializer=provider_pb2.ExecuteResponse.FromString,
    )
    operator = common_pb2.Operator(
        subject=spec["subject"], tenant=spec["tenant"], roles=["operator"]
    )

    async def to_provider(record_id: str) -> str | None:
        request = provider_pb2.ExecuteRequest(
            action_id=spec["action_id"],
            record=_record(spec, record_id),
            operator=operator,
            inputs=inputs,
            idempotency_key=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
        )
        try:
            response = await provider_call(request, timeout=timeout)
        except Exception as exc:
            return error_label(exc)
        if response.outcome != common_pb2.OUTCOME_SUCCEEDED:
            return f"OUTCOME_{common_pb2.Outcome.Name(response.outcome).removeprefix('OUTCOME_')}"
        return None

    return to_provider


@dataclass
class LagProbe:
    """End-to-end audit lag: from an execution's answer to its stored FINISHED event."""

    lags: list[float] = field(default_factory=list)
    successes: int = 0
    failed: int = 0
    timeouts: int = 0

    def result(self) -> dict[str, Any]:
        summary = latency_summary(self.lags)
        return {
            "probes": len(self.lags) + self.failed + self.timeouts,
            "measured": len(self.lags),
            "executions_succeeded": self.successes,
            "failed": self.failed,
            "timeouts": self.timeouts,
            "poll_interval_ms": LAG_POLL_S * 1000,
            **{key.replace("_ms", "_lag_ms"): value for key, value in summary.items()},
        }


async def probe_lag(
    send: Callable[[str], Awaitable[str | None]],
    audit: grpc.aio.Channel,
    spec: dict[str, Any],
    *,
    start_at: float,
    stop_at: float,
    interval_s: float,
) -> LagProbe:
    """Every ``interval_s``: execute on a fresh record, then poll its audit timeline."""
    timeline = audit.unary_unary(
        AUDIT_TIMELINE,
        request_serializer=audit_pb2.ListTimelineRequest.SerializeToString,
        response_deserializer=audit_pb2.ListTimelineResponse.FromString,
    )
    probe = LagProbe()
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    run = uuid.uuid4().hex[:8]
    n = 0
    while time.perf_counter() < stop_at:
        record_id = f"lag-{run}-{n}"
        n += 1
        if await send(record_id) is not None:
            probe.failed += 1
            continue
        probe.successes += 1
        answered = time.perf_counter()
        request = audit_pb2.ListTimelineRequest(
            tenant=spec["tenant"],
            record=common_pb2.RecordRef(type=spec["record_type"], id=record_id),
            types=[FINISHED],
        )
        while True:
            try:
                found = await timeline(request, timeout=5.0)
            except grpc.aio.AioRpcError:
                found = audit_pb2.ListTimelineResponse()
            now = time.perf_counter()
            if found.events:
                probe.lags.append(now - answered)
                break
            if now - answered > LAG_GIVE_UP_S:
                probe.timeouts += 1
                break
            await asyncio.sleep(LAG_POLL_S)
        await asyncio.sleep(interval_s)
    return probe


async def run_execute(spec: dict[str, Any]) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        send = execute_sender(channel, spec)
        counter = 0

        async def call(measured: bool) -> str | None:
            nonlocal counter
            counter += 1
            return await send(f"r-{counter % RECORDS}")

        lag_task: asyncio.Task[LagProbe] | None = None
        audit: grpc.aio.Channel | None = None
        if spec.get("lag_probe_auditlog"):
            audit = grpc.aio.insecure_channel(spec["lag_probe_auditlog"])
            now = time.perf_counter()
            lag_task = asyncio.create_task(
                probe_lag(
                    send,
                    audit,
                    spec,
                    start_at=now + spec["warmup_s"],
                    stop_at=now + spec["warmup_s"] + spec["duration_s"],
                    interval_s=float(spec["lag_probe_interval_s"]),
                )
            )
        try:
            observed = await drive(
                call,
                concurrency=int(spec["concurrency"]),
                warmup_s=float(spec["warmup_s"]),
                duration_s=float(spec["duration_s"]),
            )
            result = observed.result()
            if lag_task is not None:
                result["lag"] = (await lag_task).result()
        finally:
            if lag_task is not None and not lag_task.done():
                lag_task.cancel()
            if audit is not None:
                await audit.close()
    return result


# -- DiscoverActions fan-out ----------------------------------------------------
async def run_discover(spec: dict[str, Any]) -> dict[str, Any]:
    expected = int(spec["expected_actions"])
    degraded: Counter[str] = Counter()
    incomplete = 0
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        discover = channel.unary_unary(
            GATEWAY_DISCOVER,
            request_serializer=gateway_pb2.DiscoverActionsRequest.SerializeToString,
            response_deserializer=gateway_pb2.DiscoverActionsResponse.FromString,
        )
        metadata = (("authorization", f"Bearer {spec['token']}"),)
        counter = 0

        async def call(measured: bool) -> str | None:
            nonlocal counter, incomplete
            counter += 1
            request = gateway_pb2.DiscoverActionsRequest(
                record=_record(spec, f"f-{counter % RECORDS}"), skip_cache=True
            )
            try:
                response = await discover(
                    request, metadata=metadata, timeout=float(spec["timeout_s"])
                )
            except Exception as exc:
                return error_label(exc)
            if measured:
                for provider in response.degraded_providers:
                    degraded[f"{provider.provider_id}:{provider.reason}"] += 1
                incomplete += len(response.actions) != expected
            return None

        observed = await drive(
            call,
            concurrency=int(spec["concurrency"]),
            warmup_s=float(spec["warmup_s"]),
            duration_s=float(spec["duration_s"]),
        )
    return {
        **observed.result(),
        "expected_actions": expected,
        "incomplete_answers": incomplete,
        "degraded": dict(degraded),
    }


# -- AuditService.AppendEvents ingest -------------------------------------------
def _timestamp(now: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(now * 1e9))
    return stamp


def event_batch(tenant: str, prefix: str, first: int, size: int) -> list[audit_pb2.AuditEvent]:
    """``size`` events shaped like the gateway's: STARTED/FINISHED pairs of executions."""
    now = _timestamp(time.time())
    trace_id = uuid.uuid4().hex
    events = []
    for n in range(first, first + size):
        execution = n // 2
        events.append(
            audit_pb2.AuditEvent(
                event_id=f"{prefix}-{n}",
                type=STARTED if n % 2 == 0 else FINISHED,
                occurred_at=now,
                tenant=tenant,
                record=common_pb2.RecordRef(type="benchrec", id=f"r-{execution % RECORDS}"),
                actor="bench",
                action_id="bench.noop",
                provider_id="bench",
                execution_id=f"{prefix}-x{execution}",
                outcome=common_pb2.OUTCOME_SUCCEEDED if n % 2 else common_pb2.OUTCOME_UNSPECIFIED,
                external_ref=f"noop/r-{execution % RECORDS}",
                started_at=now,
                finished_at=now if n % 2 else None,
                trace_id=trace_id,
                span_id=trace_id[:16],
                idempotency_key=f"{prefix}-k{execution}",
                policy_ids=["operators-low-and-medium-risk"],
                inputs={"note": "bench"},
                policy_context={"principal.roles": "operator", "record.status": "open"},
            )
        )
    return events


async def run_append(spec: dict[str, Any]) -> dict[str, Any]:
    batch_size = int(spec["batch_size"])
    stored = {"warmup": 0, "measured": 0}
    duplicates = 0
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        append = channel.unary_unary(
            AUDIT_APPEND,
            request_serializer=audit_pb2.AppendEventsRequest.SerializeToString,
            response_deserializer=audit_pb2.AppendEventsResponse.FromString,
        )
        workers = int(spec["concurrency"])
        tenants = [f"{spec['tenant_prefix']}-{w}" for w in range(workers)]
        # Each worker writes its own tenant's chain, as gateways of different tenants would.
        next_worker = 0
        sent = [0] * workers
        prefix = uuid.uuid4().hex[:12]

        async def call(measured: bool) -> str | None:
            nonlocal next_worker, duplicates
            worker = next_worker
            next_worker = (next_worker + 1) % workers
            first = sent[worker]
            sent[worker] += batch_size
            batch = event_batch(tenants[worker], f"{prefix}-{worker}", first, batch_size)
            try:
                response = await append(
                    audit_pb2.AppendEventsRequest(events=batch), timeout=float(spec["timeout_s"])
                )
            except Exception as exc:
                return error_label(exc)
            stored["measured" if measured else "warmup"] += response.stored
            duplicates += response.duplicates
            return None

        observed = await drive(
            call,
            concurrency=workers,
            warmup_s=float(spec["warmup_s"]),
            duration_s=float(spec["duration_s"]),
        )
    result = observed.result()
    elapsed = result["elapsed_s"]
    return {
        **result,
        "batch_size": batch_size,
        "tenants": tenants,
        "events_stored": stored["measured"],
        "events_stored_total": stored["measured"] + stored["warmup"],
        "duplicates": duplicates,
        "events_per_s": stored["measured"] / elapsed if elapsed > 0 else 0.0,
    }


RUNNERS: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "execute": run_execute,
    "discover": run_discover,
    "append": run_append,
}


async def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one spec: ``{"kind": "execute"|"discover"|"append", "target": ..., ...}``."""
    runner = RUNNERS.get(spec.get("kind", ""))
    if runner is None:
        return {"error": f"unknown kind {spec.get('kind')!r}"}
    return await runner(spec)


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        if spec.get("kind") == "quit":
            break
        try:
            result = asyncio.run(run_spec(spec))
        except Exception as exc:  # reported to the orchestrator, which fails the run
            result = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
