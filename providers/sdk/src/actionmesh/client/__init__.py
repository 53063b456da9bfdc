"""A typed client of the actionmesh gateway, for backend services.

::

    from actionmesh.client import GatewayClient, PermissionDenied, record

    async with GatewayClient("gateway:50050", token=token_source) as gateway:
        try:
            execution = await gateway.execute(
                "workitem.retry", record("acme", "workitem", "wi-1001"), {"reason": "fixed"}
            )
        except PermissionDenied as refused:
            print(refused.reason)          # the ErrorInfo reason, e.g. POLICY_DENIED

Refusals raise the exception of their gRPC status code, each carrying ``reason``,
``metadata``, ``violations`` (BadRequest field violations) and ``retry_after_s``
(RetryInfo). Calls are retried (with the same idempotency key for executions) only
where a retry is safe; see :class:`RetryPolicy`.
"""

from actionmesh.client._client import (
    RETRYABLE_CODES,
    GatewayClient,
    InputLike,
    RetryPolicy,
    TokenSource,
    input_values,
    record,
)
from actionmesh.rpc.errors import (
    Aborted,
    ActionMeshError,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    from_rpc_error,
)
from actionmesh.rpc.tls import TlsConfig

__all__ = [
    "RETRYABLE_CODES",
    "Aborted",
    "ActionMeshError",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "GatewayClient",
    "InputLike",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "TlsConfig",
    "TokenSource",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
    "input_values",
    "record",
]
