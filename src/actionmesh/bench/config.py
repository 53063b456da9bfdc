"""What one benchmark run measures and for how long: :class:`BenchConfig`.

Two presets: the default run (under 3 minutes on 2 cores) and ``--quick`` (under
30 seconds, what the test suite smoke-tests). Every duration can be overridden
on the command line; the config lands in the JSON report as it was used.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one ``actionmesh bench`` run."""

    quick: bool = False
    """Short runs (smoke test); the numbers are indicative only."""
    out_dir: str = "bench-results"
    """Where bench.json and bench.png are written."""
    json_output: bool = False
    """Print the JSON report on stdout instead of the table."""
    postgres_url: str = ""
    """SQLAlchemy URL of a scratch PostgreSQL database for the audit ingest run; empty
    skips PostgreSQL (the reason is recorded)."""
    warmup_s: float = 2.0
    """Warm-up before each measured ExecuteAction run (not counted in the latencies)."""
    duration_s: float = 8.0
    """Measured time of each ExecuteAction run (per mode and concurrency)."""
    concurrencies: tuple[int, ...] = (1, 32)
    """Concurrent requests in flight for the ExecuteAction modes."""
    alternate_slices: int = 4
    """Runs compared with each other (gateway with and without fact resolution; the four
    fact-resolution discoveries) are measured in this many turns each, alternating, so a
    change of the machine's load lands on all of them alike."""
    fanout_sizes: tuple[int, ...] = (1, 8, 32)
    """Numbers of providers DiscoverActions fans out to."""
    fanout_delay_ms: float = 20.0
    """How long each fan-out provider takes to answer Discover."""
    fanout_warmup_s: float = 1.0
    """Warm-up before each measured fan-out run."""
    fanout_duration_s: float = 4.0
    """Measured time of each fan-out run (concurrency 1: latency, not throughput)."""
    discover_timeout_s: float = 0.5
    """The gateway's per-provider Discover deadline (what a hanging provider may cost)."""
    facts_cache_ttl_s: float = 2.0
    """The gateway's ``record_facts_cache_ttl_s`` (its default): how long discovery reuses
    a record source's answer. The uncached discovery runs use a second gateway with 0."""
    facts_discover_records: int = 10
    """Record ids the fact-resolution discovery runs rotate over (few: the caches hold them)."""
    facts_warmup_s: float = 1.0
    """Warm-up before each fact-resolution discovery run (fills the caches)."""
    facts_duration_s: float = 4.0
    """Measured time of each fact-resolution discovery run (concurrency 1)."""
    audit_warmup_s: float = 1.0
    """Warm-up of each audit ingest run."""
    audit_duration_s: float = 6.0
    """Measured time of each audit ingest run (SQLite, then PostgreSQL)."""
    audit_batch_size: int = 200
    """Events per AppendEvents call (the gateway's default outbox batch)."""
    audit_concurrency: int = 2
    """AppendEvents calls in flight, each sender writing its own tenant's chain."""
    lag_probe_interval_s: float = 0.1
    """Pause between end-to-end audit lag probes during the loaded gateway run."""
    audit_drain_timeout_s: float = 30.0
    """How long to wait, after the gateway runs, for every audit event to be stored."""
    request_timeout_s: float = 10.0
    """Deadline of every benchmark request; a request past it counts as an error."""
    profile: str = ""
    """Record the gateway with py-spy during the loaded gateway run into this file
    (.svg flame graph, .json speedscope, .txt collapsed stacks); empty: no profile."""

    def __post_init__(self) -> None:
        positive = (
            "duration_s",
            "fanout_duration_s",
            "audit_duration_s",
            "discover_timeout_s",
            "request_timeout_s",
            "audit_drain_timeout_s",
            "lag_probe_interval_s",
            "facts_duration_s",
            "facts_cache_ttl_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in (
            "warmup_s",
            "fanout_warmup_s",
            "audit_warmup_s",
            "fanout_delay_ms",
            "facts_warmup_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative")
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError("concurrencies must be positive integers")
        if not self.fanout_sizes or min(self.fanout_sizes) < 1:
            raise ValueError("fanout_sizes must be positive integers")
        if not 1 <= self.audit_batch_size <= 1000:
            raise ValueError("audit_batch_size must be in 1..1000 (the AppendEvents limit)")
        if self.audit_concurrency < 1:
            raise ValueError("audit_concurrency must be positive")
        if self.alternate_slices < 1:
            raise ValueError("alternate_slices must be positive")
        if self.facts_discover_records < 1:
            raise ValueError("facts_discover_records must be positive")

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)


QUICK = dict(
    warmup_s=0.2,
    duration_s=0.8,
    fanout_warmup_s=0.2,
    fanout_duration_s=0.8,
    facts_warmup_s=0.1,
    facts_duration_s=0.4,
    alternate_slices=2,
    audit_warmup_s=0.2,
    audit_duration_s=1.0,
    lag_probe_interval_s=0.05,
    audit_drain_timeout_s=15.0,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options (shared by ``actionmesh bench`` and ``python -m actionmesh.bench``)."""
    parser.add_argument("--quick", action="store_true", help="short runs, under 30 s (smoke test)")
    parser.add_argument(
        "--out", default=BenchConfig.out_dir, help="directory for bench.json and bench.png"
    )
    parser.add_argument(
        "--postgres-url",
        default="",
        help="scratch PostgreSQL database (postgresql+psycopg://...) for the audit ingest "
        "run; skipped without it",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    parser.add_argument("--duration-s", type=float, help="measured seconds per ExecuteAction run")
    parser.add_argument("--warmup-s", type=float, help="warm-up seconds per ExecuteAction run")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="concurrency of the ExecuteAction runs (repeatable; default 1 and 32)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="py-spy profile of the gateway during the loaded gateway run "
        "(.svg, .json speedscope or .txt collapsed stacks)",
    )


def from_args(args: argparse.Namespace) -> BenchConfig:
    """The config the parsed options ask for: a preset, then explicit overrides."""
    values: dict[str, object] = dict(QUICK) if args.quick else {}
    values.update(
        quick=bool(args.quick),
        out_dir=str(args.out),
        json_output=bool(args.json),
        postgres_url=args.postgres_url or "",
        profile=args.profile or "",
    )
    if args.duration_s is not None:
        values["duration_s"] = args.duration_s
    if args.warmup_s is not None:
        values["warmup_s"] = args.warmup_s
    if args.concurrency:
        values["concurrencies"] = tuple(args.concurrency)
    return BenchConfig(**values)  # type: ignore[arg-type]


def as_dict(config: BenchConfig) -> dict[str, object]:
    """The config as JSON-ready values (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }
