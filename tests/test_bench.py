"""`actionmesh bench --quick` runs end to end and writes a well-formed report.

The benchmark is run as a user would (its own process, real services on
loopback), bounded in time. Only the shape and the consistency of the report are
checked (every mode present, counts adding up, no audit event lost, a real PNG),
never the timings: those depend on the machine. The same holds for the cost of fact
resolution: its measures must be there and well-formed, whatever they measure.
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
MODES = {"direct", "bare_hop", "gateway", "gateway_trusted"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"requests", "successes", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms"}
# Differences between two runs: a cost too small to measure may come out below zero.
SIGNED = {"source_added_p50_ms", "source_added_mean_ms", "cache_saves_p50_ms"}
COST_KEYS = {
    "trusted_p50_ms",
    "source_p50_ms",
    "source_added_p50_ms",
    "source_added_mean_ms",
    "source_p50_over_trusted_p50",
    "source_rps_over_trusted_rps",
}
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
        signed = where.rsplit(".", 1)[-1] in SIGNED
        assert math.isfinite(value) and (signed or value >= 0), f"{where} = {value}"

    # ExecuteAction: every mode at both concurrencies, every request accounted for.
    runs = report["runs"]
    assert {(r["mode"], r["concurrency"]) for r in runs} == {(m, c) for m in MODES for c in (1, 32)}
    for run in runs:
        check_counts(run, f"{run['mode']} c={run['concurrency']}")
    for concurrency in (1, 32):
        ratios = report["ratios"][f"c{concurrency}"]
        assert ratios["gateway_p50_over_bare_hop_p50"] > 0
        assert ratios["gateway_rps_over_bare_hop_rps"] > 0

    check_fact_resolution(report)

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
    facts_events = audit["facts_discovery_events"]
    assert facts_events["stored"] == facts_events["expected"] > 0
    assert facts_events["chain_intact"] is True
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
    processes = ("registry", "auditlog", "gateway", "gateway-nocache", "noop", "proxy")
    for process in (*processes, "fanout-0", "fanout-1"):
        assert report["rss_mb"][process] > 10, process
    assert {t["name"] for t in report["targets"]} == TARGETS
    for target in report["targets"]:
        assert target["passed"] in (True, False), target
    lost = next(t for t in report["targets"] if t["name"] == "audit_events_lost")
    assert lost["passed"] is True

    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def check_fact_resolution(report: dict[str, Any]) -> None:
    """The cost of resolving facts: execute with a source vs a trusted caller at each
    concurrency, discover (caches warm) with the facts cache on and off; every answer
    decided on facts from whom it should be, every measure present and well-formed."""
    facts = report["facts"]
    assert facts["source"] == {"record_type": "benchrec", "provider": "bench"}
    assert facts["trusted"] == {"record_type": "benchtrusted", "caller": "bench-backend"}
    assert facts["cache_ttl_s"] > 0
    for concurrency in (1, 32):
        cost = facts["execute"][f"c{concurrency}"]
        check_cost(cost, f"execute c={concurrency}")
        runs = {r["mode"]: r for r in report["runs"] if r["concurrency"] == concurrency}
        assert cost["source_p50_ms"] == runs["gateway"]["p50_ms"]
        assert cost["trusted_p50_ms"] == runs["gateway_trusted"]["p50_ms"]

    discover = facts["discover"]
    assert discover["skip_cache"] is False and discover["records"] >= 1
    runs = {(r["facts_cache"], r["facts_from"]): r for r in discover["runs"]}
    assert set(runs) == {(c, f) for c in ("cached", "uncached") for f in ("trusted", "source")}
    for (cache, source), run in runs.items():
        where = f"discover {source}, facts {cache}"
        check_counts(run, where)
        assert run["incomplete_answers"] == 0, where
        assert run["degraded"] == {}, where
        vouched = "PROVIDER:bench" if source == "source" else "TRUSTED_CALLER:bench-backend"
        assert run["facts"] == {vouched: run["successes"]}, where
    for cache in ("cached", "uncached"):
        check_cost(discover[cache], f"discover facts {cache}")
        assert discover[cache]["source_p50_ms"] == runs[(cache, "source")]["p50_ms"]
    saves = discover["cache_saves_p50_ms"]
    added = discover["uncached"]["source_added_p50_ms"] - discover["cached"]["source_added_p50_ms"]
    assert math.isclose(saves, added, abs_tol=1e-9)


def check_cost(cost: dict[str, Any], where: str) -> None:
    """Both sides measured; the difference is theirs; ratios positive (never a timing bound)."""
    assert COST_KEYS <= cost.keys(), where
    assert cost["trusted_p50_ms"] > 0 and cost["source_p50_ms"] > 0, where
    added = cost["source_p50_ms"] - cost["trusted_p50_ms"]
    assert math.isclose(cost["source_added_p50_ms"], added, abs_tol=1e-9), where
    assert cost["source_p50_over_trusted_p50"] > 0, where
    assert cost["source_rps_over_trusted_rps"] > 0, where
