"""A provider that records the gRPC metadata of every call it gets (tests/test_tokens.py).

``python -m tests.token_probe_provider`` (flags as any SDK provider). For each
Describe, Discover and Execute it appends one JSON line to
``DATA_DIR/tokenprobe-calls.jsonl``: the method, every metadata key and value
the gateway sent, and the operator identity in the request. The test then
proves that the caller's token never reaches a provider while the verified
identity does.

The SDK hides metadata from handlers, so this process installs a recording
subclass of the SDK servicer before serving (in this test process only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc.aio

import actionmesh.sdk.runtime as sdk_runtime
from actionmesh.sdk import (
    ActionContext,
    ActionProviderServicer,
    NoInputs,
    Provider,
    ProviderConfig,
    Result,
    Risk,
    serve,
)
from actionmesh.v1 import provider_pb2

RECORD_TYPE = "tokenprobe"
CALL_LOG = "tokenprobe-calls.jsonl"
tokenprobe = Provider("tokenprobe", version="1.0.0", dedupe=False)


class _State:
    data_dir: Path | None = None


_state = _State()


@tokenprobe.on_start
async def remember_data_dir(config: ProviderConfig) -> None:
    _state.data_dir = Path(config.data_dir)
    _state.data_dir.mkdir(parents=True, exist_ok=True)


def record_call(method: str, context: grpc.aio.ServicerContext, operator: Any = None) -> None:
    if _state.data_dir is None:
        return
    metadata = [
        [key, value.decode(errors="replace") if isinstance(value, bytes) else value]
        for key, value in (context.invocation_metadata() or ())
    ]
    line: dict[str, Any] = {"method": method, "metadata": metadata}
    if operator is not None:
        line["operator"] = {
            "subject": operator.subject,
            "tenant": operator.tenant,
            "roles": list(operator.roles),
        }
    with (_state.data_dir / CALL_LOG).open("a") as out:
        out.write(json.dumps(line) + "\n")
        out.flush()
        os.fsync(out.fileno())


class RecordingServicer(ActionProviderServicer):
    """The SDK servicer, plus a line per call with the metadata it came with."""

    async def Describe(
        self, request: provider_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DescribeResponse:
        record_call("Describe", context)
        return await super().Describe(request, context)

    async def Discover(
        self, request: provider_pb2.DiscoverRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DiscoverResponse:
        record_call("Discover", context, request.operator)
        return await super().Discover(request, context)

    async def Execute(
        self, request: provider_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.ExecuteResponse:
        record_call("Execute", context, request.operator)
        return await super().Execute(request, context)


@tokenprobe.action(
    "tokenprobe.touch",
    label="Touch the record",
    record_types=[RECORD_TYPE],
    risk=Risk.LOW,
)
async def touch(ctx: ActionContext, inputs: NoInputs) -> Result:
    # The identity the handler sees is the one the gateway verified.
    return Result.succeeded(
        external_ref=f"touched/{ctx.record.id}",
        message=f"touched by {ctx.operator.subject}@{ctx.operator.tenant}",
    )


if __name__ == "__main__":
    sdk_runtime.ActionProviderServicer = RecordingServicer  # type: ignore[misc]
    serve(tokenprobe)
