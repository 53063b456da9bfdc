"""Domain errors that carry their gRPC status, and the interceptor that sends them.

Domain code raises :class:`ActionMeshError` subclasses and never touches status
codes itself. :class:`ErrorInterceptor` turns them into ``google.rpc.Status``
with details (``ErrorInfo`` always, ``BadRequest`` field violations for bad
input, ``RetryInfo`` when a retry helps). Any other exception becomes INTERNAL
with a generic message and a logged cause: a client never sees a stack trace.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

ERROR_DOMAIN = "actionmesh.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: its path (e.g. ``inputs.reason``) and why."""

    field: str
    description: str


class ActionMeshError(Exception):
    """Base of every error a client may see; subclasses fix the gRPC code."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        violations: Sequence[FieldViolation] = (),
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        details: list[Any] = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            )
        ]
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in self.violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            details.append(
                error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(
                        seconds=int(self.retry_after_s),
                        nanos=int((self.retry_after_s % 1) * 1e9),
                    )
                )
            )
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


class InvalidArgument(ActionMeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ActionMeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ActionMeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ActionMeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ActionMeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ActionMeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ActionMeshError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ActionMeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(ActionMeshError):
    code = grpc.StatusCode.CANCELLED


class Unknown(ActionMeshError):
    code = grpc.StatusCode.UNKNOWN


class DeadlineExceeded(ActionMeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(ActionMeshError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(ActionMeshError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ActionMeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ActionMeshError):
    code = grpc.StatusCode.INTERNAL


class DataLoss(ActionMeshError):
    code = grpc.StatusCode.DATA_LOSS


ERROR_TYPES: dict[grpc.StatusCode, type[ActionMeshError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
"""The exception type of each gRPC status code (client side: :func:`from_rpc_error`)."""


def internal_status() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see server logs")


async def _abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    await context.abort_with_status(rpc_status.to_status(status))


ErrorTranslator = Callable[[BaseException], "ActionMeshError | None"]
"""Recognises an exception of a library the rpc core does not know (a database driver's,
say) and names the ActionMeshError it stands for; None for anything else."""


def _status_for(
    exc: BaseException, method: str, translators: Sequence[ErrorTranslator] = ()
) -> status_pb2.Status:
    if isinstance(exc, ActionMeshError):
        return exc.to_status()
    for translate in translators:
        known = translate(exc)
        if known is not None:
            log.warning("%s in %s: %s (%s)", known.reason, method, known.message, exc)
            return known.to_status()
    log.exception("unhandled error in %s", method, exc_info=exc)
    return internal_status()


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by servicers onto rich gRPC statuses.

    ``translators`` turn other libraries' exceptions into typed ones (a database
    that is down becomes UNAVAILABLE with RetryInfo, not INTERNAL); what none of them
    knows is INTERNAL with a generic message, its cause logged.
    """

    def __init__(self, translators: Sequence[ErrorTranslator] = ()) -> None:
        self._translators = tuple(translators)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(
                unary_unary=_wrap_unary(handler.unary_unary, method, self._translators)
            )
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=_wrap_stream(handler.unary_stream, method, self._translators)
            )
        return handler


def _wrap_unary(
    behavior: Callable[..., Any], method: str, translators: Sequence[ErrorTranslator]
) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await _abort(context, _status_for(exc, method, translators))

    return wrapped


def _wrap_stream(
    behavior: Callable[..., Any], method: str, translators: Sequence[ErrorTranslator]
) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A streaming handler that writes with context.write (grpc's own Health.Watch)
        # is a coroutine, and grpc serves it as one only if the wrapper is one too.
        return _wrap_unary(behavior, method, translators)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await _abort(context, _status_for(exc, method, translators))

    return wrapped


@dataclass(frozen=True)
class ErrorDetails:
    """The rich details a client extracted from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()
    retry_after_s: float | None = None


def error_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Decode the ``google.rpc.Status`` details of a failed call (client side)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    status = rpc_status.from_call(error) if _has_trailers(error) else None
    if status is None:
        return ErrorDetails(code=code, message=message or "")
    reason, metadata, violations, retry = "", {}, [], None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry = info_r.retry_delay.seconds + info_r.retry_delay.nanos / 1e9
    return ErrorDetails(
        code=code,
        message=status.message,
        reason=reason,
        metadata=metadata,
        violations=tuple(violations),
        retry_after_s=retry,
    )


def _has_trailers(error: Any) -> bool:
    return hasattr(error, "trailing_metadata") and error.trailing_metadata() is not None


def from_rpc_error(error: grpc.RpcError) -> ActionMeshError:
    """The typed exception for a failed call, with its ErrorInfo reason and metadata,
    field violations and RetryInfo (as google-api-core's ``from_grpc_error`` does); the
    gRPC error is its ``__cause__``."""
    details = error_details(error)
    kind = ERROR_TYPES.get(details.code, Unknown)
    typed = kind(
        details.message,
        reason=details.reason,
        violations=details.violations,
        retry_after_s=details.retry_after_s,
        metadata=details.metadata,
    )
    typed.__cause__ = error
    return typed
