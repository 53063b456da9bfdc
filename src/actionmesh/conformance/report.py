"""Showing conformance results: a rich table for people, a dict for ``--json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from actionmesh.conformance.checks import FAIL, PASS, SKIP, CheckResult

_STYLES = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}


def summary(results: Sequence[CheckResult]) -> str:
    """``8 passed, 1 failed, 1 skipped``."""
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    return f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"


def render_table(results: Sequence[CheckResult], *, title: str = "conformance") -> Table:
    """One row per check: its name, PASS/FAIL/SKIP and the detail."""
    table = Table(title=title, caption=summary(results), show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for result in results:
        # Text, not markup: details quote provider output, which may contain [brackets].
        table.add_row(
            Text(result.name),
            Text(result.status.upper(), style=_STYLES[result.status]),
            Text(result.detail),
        )
    return table


def as_dict(address: str, results: Sequence[CheckResult]) -> dict[str, Any]:
    """The machine-readable report ``actionmesh provider check --json`` prints."""
    return {
        "address": address,
        "passed": not any(r.status == FAIL for r in results),
        "summary": summary(results),
        "checks": [{"name": r.name, "status": r.status, "detail": r.detail} for r in results],
    }
