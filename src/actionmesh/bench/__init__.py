"""``actionmesh bench``: how much the gateway costs, measured against its own limits.

    actionmesh bench                      # full run, under 3 minutes on 2 cores
    actionmesh bench --quick --out /tmp/b # under 30 s (what the tests smoke-test)
    actionmesh bench --postgres-url postgresql+psycopg://user@127.0.0.1:5432/scratch
    python -m actionmesh.bench --json     # the same, JSON on stdout

One run starts everything it needs on 127.0.0.1 (a mesh, a pass-through proxy,
a second gateway without a record facts cache, fan-out providers, audit logs),
drives it from a load generator in its own process, and writes ``bench.json``
and ``bench.png`` into ``--out``. See docs/performance.md for what each mode
measures, the baseline figures and what fact resolution costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console

from actionmesh.bench.config import BenchConfig, add_arguments, from_args

DESCRIPTION = (
    "Measure ExecuteAction direct, through a bare Python hop and through the gateway, "
    "what resolving record facts costs, DiscoverActions fan-out, audit ingest and lag, "
    "and peak RSS; write bench.json and bench.png."
)

__all__ = ["BenchConfig", "add_bench_command", "cmd_bench", "main"]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; exit 0 when it ran (targets are reported, not enforced)."""
    from actionmesh.bench.procs import ChildError
    from actionmesh.bench.report import print_tables, write_json, write_png
    from actionmesh.bench.run import BenchError, run_bench
    from actionmesh.mesh import MeshError

    config = from_args(args)
    progress = Console(stderr=True, highlight=False, soft_wrap=True)
    started = time.monotonic()

    def say(line: str) -> None:
        progress.print(f"[dim]bench {time.monotonic() - started:5.1f}s[/dim] {line}")

    try:
        report = run_bench(config, say)
    except KeyboardInterrupt:
        progress.print("bench interrupted; every process it started was stopped")
        return 130
    except (BenchError, ChildError, MeshError) as exc:
        progress.print(f"[red]bench failed:[/red] {exc}")
        progress.print(f"the services' logs are in {config.out_path / 'logs'}")
        return 1
    json_path = write_json(report, config.out_path)
    try:
        written = f"{json_path} and {write_png(report, config.out_path)}"
    except ImportError:  # the chart needs the optional extra; the figures are complete
        written = f"{json_path} (no chart: pip install 'actionmesh[bench]' for matplotlib)"
    if config.json_output:
        sys.stdout.write(json_path.read_text())
    else:
        print_tables(report, Console())
    progress.print(f"wrote {written}")
    return 0


def add_bench_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` to the ``actionmesh`` sub-commands."""
    bench = sub.add_parser(
        "bench",
        help="benchmark the gateway against a direct call and a bare Python hop",
        description=DESCRIPTION,
    )
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m actionmesh.bench", description=DESCRIPTION)
    add_arguments(parser)
    sys.exit(cmd_bench(parser.parse_args(argv)))
