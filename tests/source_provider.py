"""A record source and an action provider for ``probe`` records, for the facts tests.

``python -m tests.source_provider`` serves one of two roles (``PROBE_ROLE``):

- ``source``: provider ``probesource``, the system of record of ``probe`` records.
  Its facts are whatever ``DATA_DIR/probe-records.json`` holds right now
  (``{"tenant/id": {"status", "sensitivity", "attributes", "version"}}``), so a test
  changes a record by rewriting the file. Ids with a prefix misbehave on purpose:
  ``hang-`` never answers in time, ``boom-`` raises, ``garbage-`` answers a status with
  control characters and ``huge-`` an oversized attribute map.
- ``actions``: provider ``probeactions``, the actions on ``probe`` records (not their
  source, so the source can fail while the actions stay healthy). Every Execute is
  logged to ``DATA_DIR/probe-executions.jsonl`` with the record it was given.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from actionmesh.sdk import (
    ActionContext,
    Facts,
    Input,
    Provider,
    ProviderConfig,
    RecordView,
    Result,
    Risk,
    Unavailable,
    serve,
)

RECORD_TYPE = "probe"
RECORDS_FILE = "probe-records.json"
EXECUTIONS_FILE = "probe-executions.jsonl"
ROLE = os.environ.get("PROBE_ROLE", "source")


class _State:
    data_dir: Path = Path(".")


_state = _State()
provider = Provider("probesource" if ROLE == "source" else "probeactions", version="1.0.0")


@provider.on_start
async def remember_data_dir(config: ProviderConfig) -> None:
    _state.data_dir = Path(config.data_dir)
    _state.data_dir.mkdir(parents=True, exist_ok=True)


if ROLE == "source":

    @provider.record_source(RECORD_TYPE)
    async def resolve(tenant: str, record_id: str) -> Facts | None:
        if record_id.startswith("hang-"):
            await asyncio.sleep(60)
        if record_id.startswith("boom-"):
            raise RuntimeError("the source's own database is gone")
        if record_id.startswith("garbage-"):
            return Facts(status="open\x07\x00", version="1")
        if record_id.startswith("huge-"):
            return Facts(
                status="open", version="1", attributes={f"a{i}": "x" * 900 for i in range(200)}
            )
        path = _state.data_dir / RECORDS_FILE
        records = json.loads(path.read_text()) if path.exists() else {}
        found = records.get(f"{tenant}/{record_id}")
        if found is None:
            return None
        return Facts(
            status=found["status"],
            version=found["version"],
            sensitivity=found.get("sensitivity", "normal"),
            attributes=found.get("attributes", {}),
        )

else:

    def when_open(record: RecordView) -> bool | Unavailable:
        return record.status == "open" or Unavailable("NOT_OPEN")

    @dataclass(frozen=True)
    class NoteInputs:
        note: str = Input("", description="Free text", max_length=200)

    async def _run(ctx: ActionContext) -> Result:
        record = ctx.record
        line = {
            "action": ctx.action_id,
            "key": ctx.idempotency_key,
            "tenant": record.tenant,
            "record": record.id,
            "status": record.status,
            "sensitivity": record.sensitivity,
            "attributes": dict(record.attributes),
        }
        with (_state.data_dir / EXECUTIONS_FILE).open("a") as out:
            out.write(json.dumps(line) + "\n")
        if record.status != "open":
            return Result.rejected("NOT_OPEN", f"{record.id} is {record.status}")
        queue = record.attributes.get("queue", "-")
        return Result.succeeded(
            external_ref=f"probe/{record.id}",
            message=f"touched {record.id} (status {record.status}, queue {queue})",
        )

    @provider.action(
        "probe.touch",
        label="Touch a probe record",
        record_types=[RECORD_TYPE],
        available=when_open,
        risk=Risk.MEDIUM,
    )
    async def touch(ctx: ActionContext, inputs: NoteInputs) -> Result:
        return await _run(ctx)

    @provider.action(
        "probe.peek",
        label="Peek at a probe record",
        record_types=[RECORD_TYPE],
        risk=Risk.LOW,
    )
    async def peek(ctx: ActionContext, inputs: NoteInputs) -> Result:
        return await _run(ctx)

    @provider.action(
        "probe.guarded",
        label="Four-eyes touch",
        record_types=[RECORD_TYPE],
        risk=Risk.MEDIUM,
        requires_approval=True,
    )
    async def guarded(ctx: ActionContext, inputs: NoteInputs) -> Result:
        return await _run(ctx)


if __name__ == "__main__":
    serve(provider)
