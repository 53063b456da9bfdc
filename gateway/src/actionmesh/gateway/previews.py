"""Previews (dry runs): ask an action's provider what an execution would change.

A preview is the provider's answer to ``Preview`` (see provider.proto): the field
changes, the effect in words, warnings and the digest of the state it read. The
gateway asks for one when a caller previews an action (PreviewAction) and when it holds
an execution for approval (the approvers see it, the dispatch carries its digest).

What a provider's refusal means here, in one table (:func:`refusal_for`):

- UNIMPLEMENTED: the action has no preview (UNIMPLEMENTED ``PREVIEW_NOT_SUPPORTED``);
- INVALID_ARGUMENT: the inputs break a rule of the provider's (INVALID_ARGUMENT, its
  reason);
- FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, ALREADY_EXISTS: Execute would be
  refused (FAILED_PRECONDITION with the provider's reason, e.g. ``NO_CHANGE``);
- anything else (unreachable, too slow, failing): UNAVAILABLE ``PREVIEW_UNAVAILABLE``
  (nothing ran; ask again).

What a provider answers is bounded before it is kept or shown (the SDK's limits).
"""

from __future__ import annotations

import grpc
import grpc.aio
from opentelemetry import trace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.dispatch import Deadlines
from actionmesh.gateway.model import ExecuteCommand
from actionmesh.rpc.convert import to_timestamp, utcnow
from actionmesh.rpc.errors import (
    ActionMeshError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    Unimplemented,
    error_details,
)
from actionmesh.v1 import common_pb2, provider_pb2

tracer = trace.get_tracer("actionmesh.gateway")

MAX_CHANGES = 50
MAX_WARNINGS = 20
MAX_TEXT_CHARS = 2000
MAX_DISPLAY_CHARS = 1000
MAX_DIGEST_CHARS = 128
PREVIEW_RETRY_S = 1.0

_WOULD_BE_REFUSED = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
)


def not_previewable(action_id: str) -> Unimplemented:
    return Unimplemented(f"{action_id} has no preview", reason="PREVIEW_NOT_SUPPORTED")


def refusal_for(exc: grpc.aio.AioRpcError, entry: ProviderEntry, action_id: str) -> ActionMeshError:
    """The caller's error for a Preview the provider refused or failed (module docstring)."""
    code = exc.code()
    details = error_details(exc)
    where = {"provider_id": entry.provider_id}
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return not_previewable(action_id)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(
            details.message or "the provider refused the inputs",
            reason=details.reason or "INVALID_INPUTS",
            metadata=where,
        )
    if code in _WOULD_BE_REFUSED:
        return FailedPrecondition(
            details.message or f"{action_id} would be refused",
            reason=details.reason or code.name,
            metadata=where,
        )
    return Unavailable(
        f"provider {entry.provider_id} could not preview {action_id} ({code.name}); nothing ran",
        reason="PREVIEW_UNAVAILABLE",
        retry_after_s=PREVIEW_RETRY_S,
        metadata=where,
    )


def _text(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def bounded(reply: provider_pb2.PreviewResponse, provider_id: str) -> common_pb2.ActionPreview:
    """The provider's answer as the gateway keeps it: bounded, stamped, attributed."""
    return common_pb2.ActionPreview(
        changes=[
            common_pb2.FieldChange(
                field=_text(c.field, MAX_DISPLAY_CHARS),
                before=_text(c.before, MAX_DISPLAY_CHARS),
                after=_text(c.after, MAX_DISPLAY_CHARS),
            )
            for c in reply.changes[:MAX_CHANGES]
        ],
        effect=_text(reply.effect, MAX_TEXT_CHARS),
        warnings=[_text(w, MAX_TEXT_CHARS) for w in reply.warnings[:MAX_WARNINGS]],
        state_digest=reply.state_digest,
        previewed_at=to_timestamp(utcnow()),
        provider_id=provider_id,
    )


class Previews:
    """Asks providers for previews, within the action's deadline."""

    def __init__(self, directory: ProviderDirectory, deadlines: Deadlines) -> None:
        self._directory = directory
        self._deadlines = deadlines

    async def ask(
        self,
        caller: Caller,
        command: ExecuteCommand,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> common_pb2.ActionPreview:
        """The provider's preview of ``command`` (on the record as verified), or the error
        the caller gets (see :func:`refusal_for`)."""
        if not descriptor.previewable:
            raise not_previewable(command.action_id)
        request = provider_pb2.PreviewRequest(
            action_id=command.action_id,
            record=command.record,
            operator=caller.operator(),
            inputs=dict(command.inputs),
        )
        with tracer.start_as_current_span(
            "execute.preview",
            attributes={
                "actionmesh.action_id": command.action_id,
                "actionmesh.provider_id": entry.provider_id,
                "actionmesh.tenant": caller.tenant,
            },
        ):
            try:
                reply = await self._directory.stub(entry).Preview(
                    request, timeout=self._deadlines.timeout_for(descriptor)
                )
            except grpc.aio.AioRpcError as exc:
                raise refusal_for(exc, entry, command.action_id) from None
        if not reply.state_digest or len(reply.state_digest) > MAX_DIGEST_CHARS:
            raise Unavailable(
                f"provider {entry.provider_id} answered a preview without a valid state digest "
                f"(1..{MAX_DIGEST_CHARS} characters); it cannot be approved on",
                reason="PREVIEW_UNAVAILABLE",
                retry_after_s=PREVIEW_RETRY_S,
                metadata={"provider_id": entry.provider_id},
            )
        return bounded(reply, entry.provider_id)
