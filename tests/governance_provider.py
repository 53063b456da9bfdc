"""A provider for the governance tests, served as its own process by the test mesh.

``python -m tests.governance_provider`` (flags as any SDK provider). It leaves
a trace of every Discover and Execute it handles in ``DATA_DIR/govtest-*.jsonl``
so tests can count what really reached the provider. It does *not* dedupe on
the idempotency key, on purpose: any duplicate the gateway lets through shows.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from actionmesh.sdk import (
    ActionContext,
    Change,
    Input,
    Provider,
    ProviderConfig,
    RecordView,
    Result,
    Risk,
    serve,
)

RECORD_TYPE = "govtest"
govtest = Provider("govtest", version="1.0.0", dedupe=False)


class _State:
    data_dir: Path | None = None


_state = _State()


def log_line(kind: str, **fields: object) -> None:
    if _state.data_dir is None:
        return
    with (_state.data_dir / f"govtest-{kind}.jsonl").open("a") as out:
        out.write(json.dumps(fields) + "\n")
        out.flush()
        os.fsync(out.fileno())


@govtest.on_start
async def remember_data_dir(config: ProviderConfig) -> None:
    _state.data_dir = Path(config.data_dir)
    _state.data_dir.mkdir(parents=True, exist_ok=True)


def counted(record: RecordView) -> bool:
    # Availability predicates run on Discover: one line per action per Discover.
    log_line("discover", record=record.id)
    return True


@dataclass(frozen=True)
class SlowInputs:
    sleep_ms: int = Input(0, description="How long the handler takes", minimum=0, maximum=5000)


@govtest.action(
    "govtest.slow",
    label="Slow action",
    record_types=[RECORD_TYPE],
    available=counted,
    risk=Risk.LOW,
    timeout_s=0.5,
)
async def slow(ctx: ActionContext, inputs: SlowInputs) -> Result:
    log_line("execute", action=ctx.action_id, key=ctx.idempotency_key, record=ctx.record.id)
    await asyncio.sleep(inputs.sleep_ms / 1000)
    return Result.succeeded(
        external_ref=f"slow/{ctx.record.id}",
        changes=[Change("state", "idle", "done")],
        message=f"finished after {inputs.sleep_ms} ms",
    )


@dataclass(frozen=True)
class NoteInputs:
    note: str = Input("", description="Free text the provider may echo", max_length=200)


@govtest.action(
    "govtest.partial",
    label="Half-done action",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
)
async def partial(ctx: ActionContext, inputs: NoteInputs) -> Result:
    log_line("execute", action=ctx.action_id, key=ctx.idempotency_key, record=ctx.record.id)
    return Result.partial(
        reason="WRITE_BACK_FAILED",
        message="the external job was created but the record could not be updated",
        external_ref=f"job/{ctx.record.id}",
        changes=[Change("job", "", "created")],
    )


@govtest.action(
    "govtest.echo",
    label="Refuse, echoing the input",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
)
async def echo(ctx: ActionContext, inputs: NoteInputs) -> Result:
    log_line("execute", action=ctx.action_id, key=ctx.idempotency_key, record=ctx.record.id)
    return Result.rejected("NOT_ELIGIBLE", f"cannot act on note {inputs.note!r}")


@govtest.action(
    "govtest.guarded",
    label="Four-eyes action",
    record_types=[RECORD_TYPE],
    risk=Risk.MEDIUM,
    requires_approval=True,
)
async def guarded(ctx: ActionContext, inputs: NoteInputs) -> Result:
    log_line(
        "execute",
        action=ctx.action_id,
        key=ctx.idempotency_key,
        record=ctx.record.id,
        operator=ctx.operator.subject,
        status=ctx.record.status,
        note=inputs.note,
    )
    return Result.succeeded(
        external_ref=f"guarded/{ctx.record.id}", changes=[Change("guard", "off", "on")]
    )


if __name__ == "__main__":
    serve(govtest)
