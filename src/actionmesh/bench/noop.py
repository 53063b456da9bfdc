"""The benchmark's provider: one trivial action, so the numbers measure the hops.

``python -m actionmesh.bench.noop`` serves it like any provider binary (the SDK's
``serve``: flags or ACTIONMESH_PROVIDER_* variables, registration, health). The
direct, bare-hop and gateway modes all call this same process. ``dedupe`` is off
and the handler does no I/O: what remains is the provider SDK's own work (input
validation, tenant and record-type checks, result mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

from actionmesh.sdk import ActionContext, Input, Provider, Result, Risk, serve

PROVIDER_ID = "bench"
ACTION_ID = "bench.noop"
RECORD_TYPE = "benchrec"

provider = Provider(PROVIDER_ID, version="1.0.0", dedupe=False)


@dataclass(frozen=True)
class NoopInputs:
    """One small validated input, so the gateway's and the SDK's validation run."""

    note: str = Input(description="Any short text", min_length=1, max_length=64)


@provider.action(
    ACTION_ID,
    label="Do nothing",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
    timeout_s=10.0,
)
async def noop(ctx: ActionContext, inputs: NoopInputs) -> Result:
    """Succeed at once (the benchmark's unit of work)."""
    return Result.succeeded(external_ref=f"noop/{ctx.record.id}")


def main() -> None:
    serve(provider)


if __name__ == "__main__":
    main()
