"""The provider conformance kit: contract checks against any running provider, over gRPC.

::

    sample = SampleRecord.parse("acme/workitem/wi-1001:failed")
    results = await run_checks("127.0.0.1:50061", records=[sample])
    Console().print(render_table(results))
    assert not failed(results)

It speaks only ActionProviderService and grpc.health.v1, so it checks providers
written with or without the SDK. ``actionmesh provider check HOST:PORT`` is the
command-line front end. Every check is listed in :data:`CHECKS`; only
``execute.idempotent`` has a real side effect (it executes one action once on a
sample record you name) and is skipped without one. The ``source.*`` checks judge
the provider as a system of record (ResolveRecord, read-only): they read the sample
records of the types it sources, and do not apply to a provider that sources none.
The ``status.*`` checks ask GetExecutionStatus (read-only) about a key never sent and
about the key ``execute.idempotent`` executed; a provider that answers UNIMPLEMENTED
(it keeps no record of its executions) skips them as not supported.
"""

from actionmesh.conformance.checks import (
    CHECKS,
    FAIL,
    PASS,
    SKIP,
    CheckResult,
    Status,
    failed,
    run_checks,
)
from actionmesh.conformance.report import as_dict, render_table, summary
from actionmesh.conformance.samples import SampleRecord, invalid_cases, valid_inputs

__all__ = [
    "CHECKS",
    "FAIL",
    "PASS",
    "SKIP",
    "CheckResult",
    "SampleRecord",
    "Status",
    "as_dict",
    "failed",
    "invalid_cases",
    "render_table",
    "run_checks",
    "summary",
    "valid_inputs",
]
