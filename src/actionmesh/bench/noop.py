"""The benchmark's provider: one trivial action, so the numbers measure the hops.

``python -m actionmesh.bench.noop`` serves it like any provider binary (the SDK's
``serve``: flags or ACTIONMESH_PROVIDER_* variables, registration, health). The
direct, bare-hop and gateway modes all call this same process. ``dedupe`` is off
and the handler does no I/O: what remains is the provider SDK's own work (input
validation, tenant and record-type checks, result mapping).

It is also the **system of record** of ``benchrec`` records (a ``record_source``
answering ResolveRecord with constant facts, no I/O), so the gateway resolves a
record's facts from it at every ExecuteAction on that type, as it does for any
type with a source. ``benchtrusted`` records have no source: the bench's gateway
trusts the bench's own backend identity (``trusted_callers``) for their facts,
which is the same execution without a resolution. The difference between the two
is what resolving facts costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from actionmesh.sdk import ActionContext, Facts, Input, Provider, Result, Risk, serve

PROVIDER_ID = "bench"
ACTION_ID = "bench.noop"
RECORD_TYPE = "benchrec"
"""The record type the gateway runs use; this provider is its system of record."""
TRUSTED_RECORD_TYPE = "benchtrusted"
"""The same action on a record type without a source (facts from a trusted caller)."""
FACTS_VERSION = "1"
"""Every bench record's version: the facts never change, so caches may keep them."""

provider = Provider(PROVIDER_ID, version="1.0.0", dedupe=False)


@dataclass(frozen=True)
class NoopInputs:
    """One small validated input, so the gateway's and the SDK's validation run."""

    note: str = Input(description="Any short text", min_length=1, max_length=64)


@provider.action(
    ACTION_ID,
    label="Do nothing",
    record_types=[RECORD_TYPE, TRUSTED_RECORD_TYPE],
    risk=Risk.LOW,
    timeout_s=10.0,
)
async def noop(ctx: ActionContext, inputs: NoopInputs) -> Result:
    """Succeed at once (the benchmark's unit of work)."""
    return Result.succeeded(external_ref=f"noop/{ctx.record.id}")


@provider.record_source(RECORD_TYPE)
async def bench_facts(tenant: str, record_id: str) -> Facts:
    """Every ``benchrec`` record exists, open and of normal sensitivity (no I/O): a
    resolution costs the hop, the SDK's and the gateway's work, nothing else."""
    return Facts(status="open", version=FACTS_VERSION)


def main() -> None:
    serve(provider)


if __name__ == "__main__":
    main()
