"""The actionmesh provider SDK: declare actions on a :class:`Provider`, then serve it.

::

    from dataclasses import dataclass
    from typing import Literal

    from actionmesh.sdk import ActionContext, Input, Provider, Result, Risk, Unavailable, serve


    @dataclass(frozen=True)
    class RetryInputs:
        reason: str = Input(description="Why a retry is safe now", min_length=3, max_length=200)
        priority: Literal["low", "normal", "high"] = "normal"


    workitems = Provider("workitems", version="1.0.0", dedupe=True)


    @workitems.action(
        "workitem.retry",
        label="Retry work item",
        record_types=["workitem"],
        available=lambda r: r.status in {"failed", "stuck"} or Unavailable("STATUS_NOT_FAILED"),
        risk=Risk.LOW,
        timeout_s=5.0,
    )
    async def retry(ctx: ActionContext, inputs: RetryInputs) -> Result:
        ...
        return Result.succeeded(external_ref="wi-1001/attempt-2")


    if __name__ == "__main__":
        serve(workitems)

Everything is checked when declared (``ProviderDefinitionError``). At run time
the SDK answers Describe and Discover from the declarations, and for Execute
re-validates the inputs, checks tenant and record type, de-duplicates on the
idempotency key (``dedupe=True``), runs the handler and maps its
:class:`Result` (or exception: INTERNAL ``HANDLER_FAILED``) onto the protocol.
GetExecutionStatus (what became of an execution, by its idempotency key) is answered
from the dedupe store, or by an ``@provider.execution_status`` function returning an
:class:`ExecutionStatus`; a provider with neither answers UNIMPLEMENTED.

A long-running action (``long_running=LongRunning(max_duration_s=..., poll_interval_s=...,
cancellable=...)``) answers Execute ACCEPTED at once; its handler runs on in the
background, reports progress with ``ctx.report_progress``, may name its external work
early with ``ctx.set_external_ref``, and, when cancellable, is stopped by StopExecution
(``asyncio.CancelledError`` at its next await; ``ctx.stop_request`` says who asked; return
``Result.cancelled(...)``). See :mod:`actionmesh.sdk.servicer` for the exact semantics.

An action may have a dry run: ``@provider.preview("action.id")`` on ``async def (ctx:
PreviewContext, inputs) -> Preview`` computes, without side effects, what Execute would
change and a digest of the state read; an Execute approved on that preview is refused
REJECTED ``STATE_CHANGED_SINCE_PREVIEW`` when the digest moved.
"""

from typing import TYPE_CHECKING, Any

from actionmesh.sdk.config import ProviderConfig
from actionmesh.sdk.dedupe import (
    Claim,
    IdempotencyKey,
    IdempotencyStore,
    KeyStatus,
    MemoryIdempotencyStore,
    SqliteIdempotencyStore,
)
from actionmesh.sdk.inputs import Input, NoInputs, ProviderDefinitionError
from actionmesh.sdk.provider import ActionDefinition, Provider
from actionmesh.sdk.registration import RegistryLink
from actionmesh.sdk.resource import Resource
from actionmesh.sdk.runtime import serve, start_provider
from actionmesh.sdk.servicer import ActionProviderServicer
from actionmesh.sdk.types import (
    ActionContext,
    Change,
    ExecutionState,
    ExecutionStatus,
    Facts,
    LongRunning,
    OperatorView,
    Preview,
    PreviewContext,
    Progress,
    RecordView,
    Result,
    Risk,
    StopRequest,
    Unavailable,
)

__all__ = [
    "ActionContext",
    "ActionDefinition",
    "ActionProviderServicer",
    "Change",
    "Claim",
    "ExecutionState",
    "ExecutionStatus",
    "Facts",
    "IdempotencyKey",
    "IdempotencyStore",
    "Input",
    "KeyStatus",
    "LongRunning",
    "MemoryIdempotencyStore",
    "NoInputs",
    "OperatorView",
    "Preview",
    "PreviewContext",
    "Progress",
    "Provider",
    "ProviderConfig",
    "ProviderDefinitionError",
    "RecordView",
    "RegistryLink",
    "Resource",
    "Result",
    "Risk",
    "SqlIdempotencyStore",
    "SqliteIdempotencyStore",
    "StopRequest",
    "Unavailable",
    "serve",
    "start_provider",
]

if TYPE_CHECKING:
    from actionmesh.sdk.sqlstore import SqlIdempotencyStore


def __getattr__(name: str) -> Any:
    # SqlIdempotencyStore needs SQLAlchemy (the ``sql`` extra): imported when asked for.
    if name == "SqlIdempotencyStore":
        from actionmesh.sdk.sqlstore import SqlIdempotencyStore

        return SqlIdempotencyStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
