"""Audit measurements: AppendEvents ingest per store, and the event counts of a run.

Ingest runs against an audit log process of its own (``python -m actionmesh.auditlog``, the
binary's start-up), once on a fresh SQLite file and once on PostgreSQL when a
URL is given. Counting uses the audit log's own API: VerifyChain walks a
tenant's hash chain, so its head index is the number of events stored for that
tenant, and ``intact`` says the chain also verifies.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from actionmesh.bench.config import BenchConfig
from actionmesh.bench.procs import Launched, LoadGenerator, launch_child, peak_rss_mb
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import audit_pb2, audit_pb2_grpc


@dataclass(frozen=True)
class ChainCount:
    """How many events a tenant's chain holds, and whether it verifies."""

    events: int
    intact: bool


def chain_count(address: str, tenant: str, timeout_s: float = 30.0) -> ChainCount:
    with grpc.insecure_channel(address) as channel:
        reply = audit_pb2_grpc.AuditServiceStub(channel).VerifyChain(
            audit_pb2.VerifyChainRequest(tenant=tenant), timeout=timeout_s
        )
    if not reply.chains:
        return ChainCount(0, True)
    chain = reply.chains[0]
    return ChainCount(int(chain.head_index), bool(chain.intact))


def wait_for_events(
    address: str, tenant: str, expected: int, timeout_s: float
) -> tuple[ChainCount, float]:
    """Poll until the tenant holds ``expected`` events (bounded); the count and the wait."""
    started = time.monotonic()
    while True:
        count = chain_count(address, tenant)
        waited = time.monotonic() - started
        if count.events >= expected or waited >= timeout_s:
            return count, waited
        time.sleep(0.25)


def launch_auditlog(run_dir: Path, backend: str, database_url: str) -> Launched:
    """The ingest run's own audit log process (started early: its start-up overlaps others)."""
    return launch_child(
        f"auditlog-{backend}",
        "actionmesh.auditlog",
        ["--database-url", database_url, "--host", "127.0.0.1", "--port", "0"],
        run_dir,
    )


def ingest(
    config: BenchConfig, loadgen: LoadGenerator, launched: Launched, backend: str
) -> dict[str, Any]:
    """Load the audit log with AppendEvents, then count what it holds; stops it at the end."""
    try:
        child = launched.wait_ready()
        result = loadgen.run(
            {
                "kind": "append",
                "target": child.address,
                # Unique per run: a given PostgreSQL database may hold earlier runs.
                "tenant_prefix": f"bench-ingest-{uuid.uuid4().hex[:8]}",
                "batch_size": config.audit_batch_size,
                "concurrency": config.audit_concurrency,
                "warmup_s": config.audit_warmup_s,
                "duration_s": config.audit_duration_s,
                "timeout_s": config.request_timeout_s,
            }
        )
        stored = 0
        intact = True
        for tenant in result["tenants"]:
            count = chain_count(child.address, tenant)
            stored += count.events
            intact = intact and count.intact
        result.update(
            backend=backend,
            events_in_store=stored,
            events_lost=max(0, result["events_stored_total"] - stored),
            chains_intact=intact,
            peak_rss_mb=peak_rss_mb(child.pid),
        )
        return result
    finally:
        launched.stop()


def sqlite_ingest_url(run_dir: Path) -> str:
    return sqlite_url(run_dir / "data" / "ingest-audit.db")
