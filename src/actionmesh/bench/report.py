"""The benchmark's outputs: the targets verdict, bench.json, bench.png and a rich table.

Pass/fail is only ever judged on what the issue sets as targets: ratios measured
in the same run (gateway vs. bare hop), and the few absolute numbers it names
(fan-out p50, hanging-provider cost, ingest rate, audit lag, lost events).
Everything else is reported, not judged, the cost of fact resolution included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SCHEMA_VERSION = 1
JSON_NAME = "bench.json"
PNG_NAME = "bench.png"
EXECUTE_MODES = ("direct", "bare_hop", "gateway", "gateway_trusted")
SIGNED_MEASURES = frozenset({"source_added_p50_ms", "source_added_mean_ms", "cache_saves_p50_ms"})
"""The only numbers of the report that may be negative: differences between two runs of
the same run, where a cost too small to measure can come out below zero."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    op: str  # "<=", ">=", "<", "=="
    threshold: float
    measure: Callable[[dict[str, Any]], float | None]


def _run(report: dict[str, Any], mode: str, concurrency: int) -> dict[str, Any] | None:
    for run in report.get("runs", []):
        if run["mode"] == mode and run["concurrency"] == concurrency:
            return dict(run)
    return None


def _ratio(report: dict[str, Any], which: str, key: str) -> float | None:
    ratios = report.get("ratios", {})
    concurrency = ratios.get(which)
    value = ratios.get(f"c{concurrency}", {}).get(key)
    return None if value is None else float(value)


def _fanout(report: dict[str, Any], hang: bool) -> dict[str, Any] | None:
    runs = [r for r in report.get("fanout", {}).get("runs", []) if bool(r["hanging"]) == hang]
    return max(runs, key=lambda r: r["providers"]) if runs else None


def _hang_cost(report: dict[str, Any]) -> float | None:
    hanging, largest = _fanout(report, True), _fanout(report, False)
    if hanging is None or largest is None or not hanging["successes"]:
        return None
    return float(hanging["p50_ms"] - largest["p50_ms"])


def _largest_fanout_p50(report: dict[str, Any]) -> float | None:
    largest = _fanout(report, False)
    return None if largest is None or not largest["successes"] else float(largest["p50_ms"])


def _ingest_rate(report: dict[str, Any]) -> float | None:
    sqlite = report.get("audit", {}).get("ingest", {}).get("sqlite", {})
    return None if "events_per_s" not in sqlite else float(sqlite["events_per_s"])


def _lag_p99(report: dict[str, Any]) -> float | None:
    lag = report.get("audit", {}).get("lag", {})
    return None if not lag.get("measured") else float(lag["p99_lag_ms"])


def _lost(report: dict[str, Any]) -> float | None:
    audit = report.get("audit", {})
    lost = audit.get("gateway_events", {}).get("lost", 0)
    lost += audit.get("discovery_events", {}).get("lost", 0)
    lost += audit.get("facts_discovery_events", {}).get("lost", 0)
    for result in audit.get("ingest", {}).values():
        lost += result.get("events_lost", 0)
    return float(lost)


TARGETS = (
    Target(
        "gateway_p50_over_bare_hop_p50",
        "gateway p50 / bare-hop p50 at the lowest concurrency",
        "<=",
        1.5,
        lambda r: _ratio(r, "low_concurrency", "gateway_p50_over_bare_hop_p50"),
    ),
    Target(
        "gateway_rps_over_bare_hop_rps",
        "gateway throughput / bare-hop throughput at the highest concurrency",
        ">=",
        0.6,
        lambda r: _ratio(r, "high_concurrency", "gateway_rps_over_bare_hop_rps"),
    ),
    Target(
        "fanout_largest_p50_ms",
        "DiscoverActions p50 over the largest fan-out (providers of 20 ms each)",
        "<=",
        40.0,
        _largest_fanout_p50,
    ),
    Target(
        "hanging_provider_cost_ms",
        "p50 with one provider hanging minus p50 without, vs. the discovery deadline",
        "<=",
        -1.0,  # replaced by the run's deadline in evaluate_targets
        _hang_cost,
    ),
    Target(
        "audit_ingest_sqlite_events_per_s",
        "events/s AppendEvents stores on SQLite",
        ">=",
        5000.0,
        _ingest_rate,
    ),
    Target(
        "audit_lag_p99_ms",
        "end-to-end audit lag p99 (execution answered -> event stored) under load",
        "<",
        1000.0,
        _lag_p99,
    ),
    Target("audit_events_lost", "audit events lost at the end of the runs", "==", 0.0, _lost),
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and verdict (None when not measured)."""
    deadline = float(report.get("fanout", {}).get("discover_deadline_ms", 0.0))
    verdicts = []
    for target in TARGETS:
        threshold = deadline if target.name == "hanging_provider_cost_ms" else target.threshold
        measured = target.measure(report)
        usable = measured is not None and math.isfinite(measured)
        verdicts.append(
            {
                "name": target.name,
                "description": target.description,
                "op": target.op,
                "threshold": threshold,
                "measured": measured if usable else None,
                "passed": _OPS[target.op](measured, threshold) if usable else None,  # type: ignore[arg-type]
            }
        )
    return verdicts


# -- files ----------------------------------------------------------------------------
def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JSON_NAME
    path.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def write_png(report: dict[str, Any], out_dir: Path) -> Path:
    """Throughput and latency per mode, fan-out latency, ingest rate and what fact
    resolution costs (discovery latency, added p50), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PNG_NAME
    runs = report.get("runs", [])
    modes = [m for m in EXECUTE_MODES if any(r["mode"] == m for r in runs)]
    concurrencies = sorted({r["concurrency"] for r in runs})
    fig, axes = plt.subplots(2, 3, figsize=(19, 9))
    width = 0.8 / max(1, len(concurrencies))

    throughput, latency, discover_ax = axes[0]
    for i, concurrency in enumerate(concurrencies):
        xs = [m + (i - (len(concurrencies) - 1) / 2) * width for m in range(len(modes))]
        found = [_run(report, mode, concurrency) or {} for mode in modes]
        throughput.bar(xs, [f.get("rps", 0) for f in found], width, label=f"c={concurrency}")
        latency.bar(xs, [f.get("p50_ms", 0) for f in found], width, label=f"p50 c={concurrency}")
        latency.scatter(
            xs, [f.get("p99_ms", 0) for f in found], marker="_", s=400, color="black", zorder=3
        )
    for ax, title, unit in (
        (throughput, "ExecuteAction throughput", "requests/s"),
        (latency, "ExecuteAction latency (bars p50, ticks p99)", "ms"),
    ):
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.legend()
    latency.set_yscale("log")

    fanout_ax, audit_ax, cost_ax = axes[1]
    fanout_runs = report.get("fanout", {}).get("runs", [])
    labels = [r["scenario"] for r in fanout_runs]
    fanout_ax.bar(labels, [r["p50_ms"] for r in fanout_runs], label="p50")
    fanout_ax.scatter(
        labels, [r["p99_ms"] for r in fanout_runs], marker="_", s=400, color="black", label="p99"
    )
    fanout_ax.axhline(40, linestyle="--", color="tab:red", label="target p50 40 ms")
    deadline = report.get("fanout", {}).get("discover_deadline_ms")
    if deadline:
        fanout_ax.axhline(deadline, linestyle=":", color="tab:gray", label="discover deadline")
    fanout_ax.set_yscale("log")
    fanout_ax.set_title("DiscoverActions fan-out latency (providers of 20 ms)")
    fanout_ax.set_xlabel("providers")
    fanout_ax.set_ylabel("ms")
    fanout_ax.legend()

    ingest = report.get("audit", {}).get("ingest", {})
    backends = [b for b, r in ingest.items() if "events_per_s" in r]
    audit_ax.bar(backends, [ingest[b]["events_per_s"] for b in backends], color="tab:green")
    audit_ax.axhline(5000, linestyle="--", color="tab:red", label="target 5000 events/s")
    lag = report.get("audit", {}).get("lag", {})
    if lag.get("measured"):
        audit_ax.set_xlabel(
            f"end-to-end audit lag under load: p50 {lag['p50_lag_ms']:.0f} ms, "
            f"p99 {lag['p99_lag_ms']:.0f} ms"
        )
    audit_ax.set_title("AuditService.AppendEvents ingest")
    audit_ax.set_ylabel("events/s")
    audit_ax.legend()

    _plot_facts(report.get("facts", {}), discover_ax, cost_ax)

    machine = report.get("machine", {})
    fig.suptitle(
        f"actionmesh bench ({'quick' if report['config'].get('quick') else 'full'}) - "
        f"{machine.get('cpu_count')} CPUs, Python {machine.get('python')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_facts(facts: dict[str, Any], discover_ax: Any, cost_ax: Any) -> None:
    """Discovery latency per (facts from, facts cache), and the p50 a source adds."""
    discover = facts.get("discover", {})
    runs = discover.get("runs", [])
    labels = [f"{r['facts_from']}\nfacts {r['facts_cache']}" for r in runs]
    discover_ax.bar(
        labels,
        [r["p50_ms"] for r in runs],
        color=["tab:gray" if r["facts_from"] == "trusted" else "tab:purple" for r in runs],
        label="p50",
    )
    discover_ax.scatter(
        labels, [r["p99_ms"] for r in runs], marker="_", s=400, color="black", label="p99"
    )
    discover_ax.set_title("DiscoverActions c=1, caches warm: facts trusted or from a source")
    discover_ax.set_ylabel("ms")
    discover_ax.legend()

    names: list[str] = []
    found: list[dict[str, Any]] = []
    for key, measured in sorted(facts.get("execute", {}).items(), key=lambda kv: int(kv[0][1:])):
        names.append(f"execute\n{key.replace('c', 'c=')}")
        found.append(measured)
    for cache in ("cached", "uncached"):
        if cache in discover:
            names.append(f"discover\nfacts {cache}")
            found.append(discover[cache])
    ratios = [f["source_p50_over_trusted_p50"] or 0.0 for f in found]
    bars = cost_ax.bar(names, ratios, color="tab:purple")
    cost_ax.bar_label(bars, [f"{f['source_added_p50_ms']:+.2f} ms" for f in found])
    cost_ax.axhline(1, color="black", linewidth=0.8)
    cost_ax.margins(y=0.12)
    cost_ax.set_title("Fact resolution: p50 with a source / p50 trusted (same run)")
    cost_ax.set_ylabel("ratio (labels: p50 added)")


# -- terminal -----------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_tables(report: dict[str, Any], console: Console) -> None:
    runs = Table(
        title="ExecuteAction: direct, bare hop, gateway (facts: source, trusted caller)",
        pad_edge=False,
    )
    runs.add_column("mode", no_wrap=True, min_width=len("gateway_trusted"))
    for column in ("conc.", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"):
        runs.add_column(column, justify="right")
    for run in report.get("runs", []):
        runs.add_row(
            run["mode"],
            str(run["concurrency"]),
            _fmt(run["requests"]),
            _fmt(run["errors"]),
            _fmt(run["rps"], 0),
            _fmt(run["p50_ms"]),
            _fmt(run["p90_ms"]),
            _fmt(run["p99_ms"]),
        )
    console.print(runs)

    fanout = Table(title="DiscoverActions fan-out (concurrency 1, skip_cache)")
    for column in ("providers", "calls", "errors", "incomplete", "p50 ms", "p99 ms", "max ms"):
        fanout.add_column(column, justify="right")
    for run in report.get("fanout", {}).get("runs", []):
        fanout.add_row(
            run["scenario"],
            _fmt(run["successes"]),
            _fmt(run["errors"]),
            _fmt(run["incomplete_answers"]),
            _fmt(run["p50_ms"], 1),
            _fmt(run["p99_ms"], 1),
            _fmt(run["max_ms"], 1),
        )
    console.print(fanout)

    audit = report.get("audit", {})
    audits = Table(title="Audit")
    audits.add_column("measure")
    audits.add_column("value", justify="right")
    for name in ("gateway_events", "discovery_events", "facts_discovery_events"):
        counts = audit.get(name, {})
        if counts:
            audits.add_row(
                f"{name.replace('_', ' ')} stored / expected",
                f"{counts['stored']:,} / {counts['expected']:,} (lost {counts['lost']})",
            )
    lag = audit.get("lag", {})
    if lag.get("measured"):
        audits.add_row(
            "end-to-end lag p50 / p99 / max",
            f"{lag['p50_lag_ms']:.0f} / {lag['p99_lag_ms']:.0f} / {lag['max_lag_ms']:.0f} ms "
            f"({lag['measured']} probes)",
        )
    for backend, result in audit.get("ingest", {}).items():
        if "skipped" in result:
            audits.add_row(f"ingest {backend}", f"skipped: {result['skipped']}")
        else:
            audits.add_row(
                f"ingest {backend}",
                f"{result['events_per_s']:,.0f} events/s "
                f"(batch {result['batch_size']}, p50 {result['p50_ms']:.1f} ms/batch)",
            )
    console.print(audits)

    _print_facts(report.get("facts", {}), console)

    rss = Table(title="Peak RSS (VmHWM)")
    rss.add_column("process")
    rss.add_column("MiB", justify="right")
    for name, value in report.get("rss_mb", {}).items():
        rss.add_row(name, _fmt(value, 1))
    console.print(rss)

    targets = Table(title="Targets")
    for column in ("target", "measured", "threshold", "verdict"):
        targets.add_column(column, justify="left" if column == "target" else "right")
    for verdict in report.get("targets", []):
        passed = verdict["passed"]
        targets.add_row(
            verdict["name"],
            _fmt(verdict["measured"]),
            f"{verdict['op']} {_fmt(verdict['threshold'])}",
            "-" if passed is None else ("[green]pass[/green]" if passed else "[red]FAIL[/red]"),
        )
    console.print(targets)


def _print_facts(facts: dict[str, Any], console: Console) -> None:
    """What resolving a record's facts from its source costs, against a trusted caller."""
    if not facts:
        return
    table = Table(
        title=f"Fact resolution: facts from a source ({facts['source']['record_type']}) vs "
        f"a trusted caller ({facts['trusted']['record_type']}), same run"
    )
    table.add_column("call", no_wrap=True)
    table.add_column("facts", no_wrap=True)
    for column in ("trusted p50", "source p50", "added ms", "p50 x", "req/s x"):
        table.add_column(column, justify="right")

    def row(call: str, cache: str, found: dict[str, Any]) -> None:
        table.add_row(
            call,
            cache,
            _fmt(found["trusted_p50_ms"]),
            _fmt(found["source_p50_ms"]),
            f"{found['source_added_p50_ms']:+.2f}",
            _fmt(found["source_p50_over_trusted_p50"]),
            _fmt(found["source_rps_over_trusted_rps"]),
        )

    for key, found in sorted(facts.get("execute", {}).items(), key=lambda kv: int(kv[0][1:])):
        row(f"execute c={key[1:]}", "fresh", found)
    discover = facts.get("discover", {})
    for cache in ("cached", "uncached"):
        if cache in discover:
            row(f"discover c={discover.get('concurrency', 1)}", cache, discover[cache])
    console.print(table)
    notes = [
        f"facts cached for {facts['cache_ttl_s']:g} s at discovery (uncached: a second "
        "gateway with record_facts_cache_ttl_s=0)"
    ]
    if "cache_saves_p50_ms" in discover:
        notes.append(
            f"the facts cache saves {discover['cache_saves_p50_ms']:+.2f} ms of p50 per "
            "discovery (uncached added minus cached added)"
        )
    for note in notes:
        console.print(f"  {note}", highlight=False)
