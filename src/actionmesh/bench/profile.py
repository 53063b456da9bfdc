"""Summarize a py-spy profile (``--format raw`` collapsed stacks): where the time goes.

    py-spy record --pid GATEWAY_PID --format raw --gil -o gateway.txt --duration 10
    python -m actionmesh.bench.profile gateway.txt            # top functions, by area
    python -m actionmesh.bench.profile gateway.txt --top 40 --match gateway/
    python -m actionmesh.bench.profile threads.txt --by-thread   # recorded --idle --threads

Each line of the input is ``frame;frame;...;leaf COUNT``. The summary gives the
share of samples per area (the library or package of the innermost frame that
is not the standard library's plumbing), the top functions by inclusive and by
self samples, and, with ``--match``, only the frames whose file matches (e.g. the
gateway's own steps, inclusive of everything they call).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# (area, pattern on a frame's file): first match from the leaf upwards wins.
AREAS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("SQLite / DB driver", r"sqlalchemy/engine/default\.py|sqlite3|psycopg"),
        ("SQLAlchemy ORM/Core", r"sqlalchemy/"),
        ("Cedar policy (cedarpy)", r"cedarpy/"),
        ("JWT (PyJWT, cryptography)", r"jwt/|cryptography/"),
        ("OpenTelemetry", r"opentelemetry/|trace/__init__\.py|_decorator\.py"),
        ("protobuf", r"protobuf/|google/protobuf"),
        ("gRPC (aio)", r"grpc/"),
        ("logging", r"logging/"),
        ("json", r"json/"),
        ("uuid/hashlib", r"uuid\.py|hashlib"),
        ("gateway code", r"gateway/"),
        ("actionmesh runtime", r"actionmesh/"),
        ("asyncio event loop", r"asyncio/|selectors\.py"),
        ("threads (to_thread pool)", r"threading\.py|concurrent/futures"),
    )
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    """Samples per stack, aggregated."""

    total: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    areas: Counter[str] = field(default_factory=Counter)


def function_of(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame ``func (file:line)``, line dropped."""
    found = FRAME.match(frame.strip())
    if found is None:
        return frame.strip(), ""
    return found["func"], found["file"]


def area_of(stack: Sequence[str]) -> str:
    for frame in reversed(stack):
        _, path = function_of(frame)
        for name, pattern in AREAS:
            if pattern.search(path):
                return name
    return "other"


def parse(lines: Iterable[str]) -> Profile:
    profile = Profile()
    for line in lines:
        stack_text, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        stack = [
            f for f in stack_text.split(";") if f and not f.startswith(("thread ", "process "))
        ]
        if not stack:
            continue
        profile.total += count
        names = [" ".join(function_of(frame)).strip() for frame in stack]
        for name in set(names):
            profile.inclusive[name] += count
        profile.own[names[-1]] += count
        profile.areas[area_of(stack)] += count
    return profile


def report(profile: Profile, top: int, match: str | None) -> str:
    if not profile.total:
        return "no samples"
    lines = [f"{profile.total} samples", "", "by area (innermost recognised frame):"]
    for name, count in profile.areas.most_common():
        lines.append(f"  {100 * count / profile.total:5.1f}%  {name}")
    chosen = [
        (name, count)
        for name, count in profile.inclusive.most_common()
        if match is None or match in name
    ]
    lines += ["", f"top {top} by inclusive samples" + (f" matching {match!r}:" if match else ":")]
    lines += [f"  {100 * c / profile.total:5.1f}%  {n}" for n, c in chosen[:top]]
    lines += ["", f"top {top} by self samples:"]
    lines += [f"  {100 * c / profile.total:5.1f}%  {n}" for n, c in profile.own.most_common(top)]
    return "\n".join(lines)


IDLE_LEAVES = (
    re.compile(r"EpollSelector\.select|select \(selectors"),  # the event loop waiting
    re.compile(r"_worker \(concurrent/futures/thread\.py:8[01]\)"),  # pool thread waiting
)


def by_thread(lines: Iterable[str], match: str, top: int) -> str:
    """For ``py-spy record --idle --threads``: each thread's busy share, by the innermost
    frame whose file contains ``match`` (what the thread was doing for that code)."""
    threads: dict[str, Counter[str]] = {}
    for line in lines:
        stack_text, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack_text.startswith("thread (") or not count_text.isdigit():
            continue
        head, *stack = stack_text.split(";")
        name = head.split(": ", 1)[-1]
        if any("Timer.run" in frame for frame in stack):
            name = "threading.Timer threads"
        leaf = stack[-1] if stack else ""
        if any(pattern.search(leaf) for pattern in IDLE_LEAVES):
            what = "(idle)"
        else:
            ours = [f for f in stack if match in f and "__main__.py" not in f]
            what = ours[-1] if ours else f"(other) {leaf}"
            if "do_execute" in leaf or "do_commit" in leaf:
                what += "  [inside the DB driver]"
        threads.setdefault(name, Counter())[what] += int(count_text)
    out = []
    for name, counts in sorted(threads.items(), key=lambda item: -sum(item[1].values())):
        total = sum(counts.values())
        out.append(f"== {name} ({total} samples)")
        out += [f"  {100 * c / total:5.1f}%  {what}" for what, c in counts.most_common(top)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m actionmesh.bench.profile",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("path", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only functions whose name or file contains this")
    parser.add_argument(
        "--by-thread",
        action="store_true",
        help="per-thread busy/idle breakdown (record with --idle --threads)",
    )
    args = parser.parse_args(argv)
    with args.path.open() as lines:
        if args.by_thread:
            print(by_thread(lines, args.match or "gateway/", args.top))
        else:
            print(report(parse(lines), args.top, args.match))


if __name__ == "__main__":
    main()
