"""A provider for the fault suite, served as its own process: ``python -m tests.fault_provider``.

Each handler invocation appends one JSON line (idempotency key, execution id,
pid) to a journal file and fsyncs it *before* acting, so the journal survives a
SIGKILL right after and the suite can prove no key ran twice at the handler
level, across provider restarts too. It uses the SDK's dedupe on its own SQLite
file under the data directory, which outlives the process.

One module, several providers: the environment chooses the provider id (and so
its action ``<id>.touch`` on record type ``faultrec``), the journal, the
handler's default sleep and the action's timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from actionmesh.sdk import ActionContext, Change, Input, Provider, Result, Risk, serve

PROVIDER_ID_ENV = "FAULT_PROVIDER_ID"
JOURNAL_ENV = "FAULT_JOURNAL"
SLEEP_MS_ENV = "FAULT_SLEEP_MS"
TIMEOUT_S_ENV = "FAULT_TIMEOUT_S"
RECORD_TYPE = "faultrec"

PROVIDER_ID = os.environ.get(PROVIDER_ID_ENV, "faulty")
ACTION_ID = f"{PROVIDER_ID}.touch"
DEFAULT_SLEEP_MS = int(os.environ.get(SLEEP_MS_ENV, "50"))

fault = Provider(PROVIDER_ID, version="1.0.0", dedupe=True)


@dataclass(frozen=True)
class TouchInputs:
    sleep_ms: int = Input(
        0,
        description="How long the handler takes (0: the provider's default)",
        minimum=0,
        maximum=20000,
    )


def journal(key: str, execution_id: str) -> None:
    """One line per handler invocation, on disk before the handler acts."""
    path = os.environ.get(JOURNAL_ENV)
    if not path:
        return
    line = json.dumps({"key": key, "execution_id": execution_id, "pid": os.getpid()}) + "\n"
    # O_APPEND keeps concurrent lines whole; fsync makes a SIGKILL right after harmless.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_journal(path: Path) -> list[dict[str, str]]:
    """The journal's entries (a torn last line, from a kill mid-write, is skipped)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


@fault.action(
    ACTION_ID,
    label="Touch a fault-test record",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
    timeout_s=float(os.environ.get(TIMEOUT_S_ENV, "2.0")),
)
async def touch(ctx: ActionContext, inputs: TouchInputs) -> Result:
    await asyncio.to_thread(journal, ctx.idempotency_key, ctx.request_id)
    await asyncio.sleep((inputs.sleep_ms or DEFAULT_SLEEP_MS) / 1000)
    return Result.succeeded(
        external_ref=f"{PROVIDER_ID}/{ctx.record.id}",
        changes=[Change("touched", "no", "yes")],
    )


if __name__ == "__main__":
    serve(fault)
