"""A provider of long-running actions for the gateway's tests: ``python -m tests.long_provider``.

Provider ``longjobs`` acts on ``lrjob`` records (the tests vouch for their facts as the
trusted backend). Its handlers run until the test lets them go on: a handler waits for
``DATA_DIR/gates/<idempotency key>.<step>`` to exist before each step, so a test decides
when an execution makes progress and when it finishes, and can cancel it in between.

- ``lrjob.run``: two steps (progress 50 % "halfway" after the first), then SUCCEEDED with
  a change; cancellable; polled every 0.2 s; at most 60 s.
- ``lrjob.stuck``: never goes on; cancellable; at most 2 s (the gateway stops it).
- ``lrjob.fixed``: like run, but not cancellable.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from actionmesh.sdk import (
    ActionContext,
    Change,
    LongRunning,
    NoInputs,
    Provider,
    ProviderConfig,
    Result,
    Risk,
    serve,
)

RECORD_TYPE = "lrjob"
GATES = "gates"
provider = Provider("longjobs", version="1.0.0", dedupe=True)


@dataclass
class _State:
    gates: Path = Path(".")


_state = _State()


@provider.on_start
async def remember_gates(config: ProviderConfig) -> None:
    _state.gates = Path(config.data_dir) / GATES
    _state.gates.mkdir(parents=True, exist_ok=True)


def gate_path(data_dir: Path, key: str, step: int) -> Path:
    """The file that lets the execution under ``key`` take ``step``."""
    return data_dir / GATES / f"{key}.{step}"


async def _wait_for(ctx: ActionContext, step: int) -> None:
    gate = gate_path(_state.gates.parent, ctx.idempotency_key, step)
    while not gate.exists():  # noqa: ASYNC110 - the gate is a file another process writes
        await asyncio.sleep(0.05)


async def _two_steps(ctx: ActionContext) -> Result:
    ctx.report_progress(0, "waiting for step 1")
    await _wait_for(ctx, 1)
    ctx.report_progress(50, "halfway")
    await _wait_for(ctx, 2)
    return Result.succeeded(
        external_ref=f"job-{ctx.idempotency_key[:8]}", changes=[Change("state", "queued", "done")]
    )


@provider.action(
    "lrjob.run",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
    long_running=LongRunning(max_duration_s=60, poll_interval_s=0.2, cancellable=True),
)
async def run(ctx: ActionContext, inputs: NoInputs) -> Result:
    """Run the job in two steps."""
    return await _two_steps(ctx)


@provider.action(
    "lrjob.fixed",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
    long_running=LongRunning(max_duration_s=60, poll_interval_s=0.2, cancellable=False),
)
async def fixed(ctx: ActionContext, inputs: NoInputs) -> Result:
    """Run the job in two steps; it cannot be stopped once accepted."""
    return await _two_steps(ctx)


@provider.action(
    "lrjob.stuck",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
    long_running=LongRunning(max_duration_s=2, poll_interval_s=0.2, cancellable=True),
)
async def stuck(ctx: ActionContext, inputs: NoInputs) -> Result:
    """Never goes on by itself."""
    ctx.report_progress(10, "stuck")
    await _wait_for(ctx, 99)
    return Result.succeeded()


if __name__ == "__main__":
    serve(provider)
