"""`actionmesh bench --quick` runs end to end and writes a well-formed report.

The benchmark is run as a user would (its own process, real services on
loopback), bounded in time. Only the shape and the consistency of the report are
checked (every mode present, counts adding up, no audit event lost, a real PNG),
never the timings: those depend on the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = {"direct", "bare_hop", "gateway"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"requests", "successes", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms"}
TARGETS = {
    "gateway_p50_over_bare_hop_p50",
    "gateway_rps_over_bare_hop_rps",
    "fanout_largest_p50_ms",
    "hanging_provider_cost_ms",
    "audit_ingest_sqlite_events_per_s",
    "audit_lag_p99_ms",
    "audit_events_lost",
}


def numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON document, with where it is."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for key, item in value.items() for n in numbers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [n for i, item in enumerate(value) for n in numbers(item, f"{path}[{i}]")]
    return []


def check_counts(run: dict[str, Any], where: str) -> None:
    assert RUN_KEYS <= run.keys(), where
    assert run["requests"] == run["successes"] + run["errors"], where
    assert run["errors"] == sum(run["errors_by_code"].values()), where
    assert run["successes"] > 0, f"{where}: no successful request ({run['errors_by_code']})"
    assert run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"], where


@pytest.fixture
def postgres_url_if_any(request: pytest.FixtureRequest) -> str:
    """A scratch PostgreSQL database when the machine can give one, else "" (ingest skips)."""
    try:
        return str(request.getfixturevalue("postgres_url"))
    except pytest.skip.Exception:
        return ""


@pytest.mark.timeout(240)
def test_quick_bench_writes_a_well_formed_report(tmp_path: Path, postgres_url_if_any: str) -> None:
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "actionmesh.bench", "--quick", "--json", "--out", str(out)]
    if postgres_url_if_any:
        command += ["--postgres-url", postgres_url_if_any]
    finished = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=200, check=False
    )
    assert finished.returncode == 0, finished.stderr[-4000:]

    report = json.loads(finished.stdout)
    assert json.loads((out / "bench.json").read_text()) == report
    assert report["schema_version"] == 1
    assert report["config"]["quick"] is True
    assert report["machine"]["cpu_count"] >= 1
    assert report["machine"]["python"].startswith("3.")
    for where, value in numbers(report):
        assert math.isfinite(value) and value >= 0, f"{where} = {value}"

    # ExecuteAction: every mode at both concurrencies, every request accounted for.
    runs = report["runs"]
    assert {(r["mode"], r["concurrency"]) for r in runs} == {(m, c) for m in MODES for c in (1, 32)}
    for run in runs:
        check_counts(run, f"{run['mode']} c={run['concurrency']}")
    for concurrency in (1, 32):
        ratios = report["ratios"][f"c{concurrency}"]
        assert ratios["gateway_p50_over_bare_hop_p50"] > 0
        assert ratios["gateway_rps_over_bare_hop_rps"] > 0

    # Fan-out: 1, 8, 32 providers, then 32 with one hanging, which every answer names.
    fanout = {run["scenario"]: run for run in report["fanout"]["runs"]}
    assert list(fanout) == ["1", "8", "32", "32+hang"]
    for name, run in fanout.items():
        check_counts(run, f"fan-out {name}")
    hang = fanout["32+hang"]
    assert hang["degraded"]["fan-hang:DEADLINE_EXCEEDED"] == hang["successes"]

    # Audit: exact counts (2 events per execution, 1 per discovery), lag probed, ingest stored.
    audit = report["audit"]
    gateway_events = audit["gateway_events"]
    assert gateway_events["expected"] == 2 * gateway_events["executions"] > 0
    assert gateway_events["stored"] == gateway_events["expected"]
    assert gateway_events["chain_intact"] is True
    assert audit["discovery_events"]["stored"] == audit["discovery_events"]["expected"] > 0
    assert audit["lag"]["measured"] >= 1
    assert audit["lag"]["timeouts"] == 0
    sqlite = audit["ingest"]["sqlite"]
    assert sqlite["events_stored"] > 0
    assert sqlite["events_in_store"] == sqlite["events_stored_total"]
    assert sqlite["chains_intact"] is True
    postgres = audit["ingest"]["postgresql"]
    if postgres_url_if_any:
        assert postgres["events_in_store"] == postgres["events_stored_total"] > 0
    else:
        assert postgres["skipped"]
    assert report["audit_events_lost"] == 0

    # Peak RSS of every service process, and every target judged or marked unmeasured.
    for process in ("registry", "auditlog", "gateway", "noop", "proxy", "fanout-0", "fanout-1"):
        assert report["rss_mb"][process] > 10, process
    assert {t["name"] for t in report["targets"]} == TARGETS
    for target in report["targets"]:
        assert target["passed"] in (True, False), target
    lost = next(t for t in report["targets"] if t["name"] == "audit_events_lost")
    assert lost["passed"] is True

    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
