"""Builds the grpc.aio server every actionmesh service runs.

Binaries and tests use the same :func:`start_server`: it adds the error
interceptor (and a guard turning undecodable requests into INVALID_ARGUMENT),
OpenTelemetry instrumentation, grpc.health.v1 and reflection,
binds the address (port 0 picks a free port) and returns the bound port.
:func:`run_service` is the process entry point: it waits for SIGTERM/SIGINT,
marks health NOT_SERVING first, then drains in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from actionmesh.rpc.errors import (
    ErrorInterceptor,
    ErrorTranslator,
    FieldViolation,
    InvalidArgument,
)
from actionmesh.rpc.supervisor import Supervisor
from actionmesh.rpc.telemetry import server_interceptors, shutdown_tracing
from actionmesh.rpc.tls import TlsConfig

log = logging.getLogger(__name__)

# Servicer registration: (add_XServicer_to_server, servicer instance, full service name).
Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]


@dataclass
class RunningServer:
    """A started server: its bound port and the handles needed to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    # Run before draining (e.g. deregister, so no new work is routed here).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run once in-flight calls have drained (e.g. close stores they write to).
    after_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Extra facts for the ready file (e.g. metrics_port), set by the service's wiring.
    ready_info: dict[str, Any] = field(default_factory=dict)
    # The service's background loops, when it has any (their health is this server's).
    supervisor: Supervisor | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def supervise(self, supervisor: Supervisor) -> None:
        """Report ``supervisor``'s loops in this server's health from now on."""
        self.supervisor = supervisor
        await supervisor.attach(self)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING, stop hooks, drain calls, then after-drain hooks."""
        # Every health name (the service's own and extras such as the gateway's policy
        # status), and for good: a background task's later set() cannot flip it back.
        await self.health.enter_graceful_shutdown()
        await _run_hooks(self.on_stop)
        await self.server.stop(grace_s)
        await _run_hooks(self.after_drain)


async def _run_hooks(hooks: Sequence[Callable[[], Awaitable[None]]]) -> None:
    for hook in hooks:
        try:
            await hook()
        except Exception:
            log.exception("stop hook failed")


class CannotStart(RuntimeError):
    """A start-up failure that is the operator's to fix (a database schema that is not
    current, say), not a crash: :func:`run_service` logs it in one line and exits 1."""


class _Undecodable:
    """Stands in for request bytes that are not the method's message."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Undecodable request bytes become INVALID_ARGUMENT with a field violation.

    grpc answers UNKNOWN when a request deserializer raises, which reads as a
    server fault; bytes that are not the method's message (corrupt wire format,
    invalid UTF-8 in a string field) are the caller's bad input. Installed inside
    :class:`ErrorInterceptor`, so the refusal carries the usual details.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def guarded_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:  # whatever the parser objects to, the bytes are at fault
                return _UNDECODABLE

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def checked_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _refuse_undecodable(request)
                return await unary(request, context)

            return handler._replace(request_deserializer=guarded_decode, unary_unary=checked_unary)
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(
            handler.unary_stream
        ):
            # A coroutine that writes with context.write (grpc's Health.Watch) stays one.
            writer = handler.unary_stream

            async def checked_writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _refuse_undecodable(request)
                return await writer(request, context)

            return handler._replace(
                request_deserializer=guarded_decode, unary_stream=checked_writer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def checked_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                _refuse_undecodable(request)
                async for item in stream(request, context):
                    yield item

            return handler._replace(
                request_deserializer=guarded_decode, unary_stream=checked_stream
            )
        return handler


def _refuse_undecodable(request: Any) -> None:
    if request is _UNDECODABLE:
        raise InvalidArgument(
            "the request is not a valid protobuf message for this method",
            reason="MALFORMED_REQUEST",
            violations=[
                FieldViolation("request", "malformed protobuf wire format or invalid UTF-8")
            ],
        )


# Requests above this size are refused by grpc itself with RESOURCE_EXHAUSTED,
# before any bytes are decoded. Services pass their own bound (the gateway 1 MiB).
DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_SEND_BYTES = 4 * 1024 * 1024


async def start_server(
    registrations: Sequence[Registration],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_SEND_BYTES,
    max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    credentials: grpc.ServerCredentials | None = None,
    tls: TlsConfig | None = None,
    require_client_cert: bool = True,
    error_translators: Sequence[ErrorTranslator] = (),
) -> RunningServer:
    """Start a grpc.aio server with health, reflection and interceptors.

    ``max_receive_bytes`` bounds every request (larger ones get RESOURCE_EXHAUSTED
    from grpc); ``max_message_bytes`` bounds every response. With ``credentials``
    (see :meth:`actionmesh.rpc.tls.TlsConfig.server_credentials`) the port serves
    TLS only: health and reflection included, plaintext clients are refused. ``tls``
    (a service's TLS settings) builds those credentials when it is enabled, asking
    clients for a certificate unless ``require_client_cert`` is False.
    ``error_translators`` name the status of other libraries' exceptions (see
    :class:`~actionmesh.rpc.errors.ErrorInterceptor`).
    """
    if credentials is None and tls is not None and tls.enabled:
        credentials = tls.server_credentials(require_client_cert=require_client_cert)
    server = grpc.aio.server(
        interceptors=[
            *server_interceptors(),
            ErrorInterceptor(error_translators),
            DecodeGuard(),
        ],
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    bound = (
        server.add_secure_port(f"{host}:{port}", credentials)
        if credentials is not None
        else server.add_insecure_port(f"{host}:{port}")
    )
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    running = RunningServer(server=server, port=bound, health=health_servicer, service_names=names)
    await running.set_serving(True)
    return running


def write_ready_file(path: str | os.PathLike[str] | None, **info: Any) -> None:
    """Tell a supervisor (``actionmesh up``, tests) where this process listens."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(target)


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ACTIONMESH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def run_service(
    start: Callable[[], Awaitable[RunningServer]],
    *,
    name: str,
    ready_file: str | None,
    grace_s: float = 5.0,
) -> None:
    """Start a service, announce it, and stop gracefully on SIGTERM or SIGINT."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        running = await start()
    except CannotStart as exc:
        # An operator's problem (schema not current, foreign tables), not a crash: one line.
        log.error("%s cannot start: %s", name, exc)
        raise SystemExit(1) from None
    log.info("%s listening on %s", name, running.address)
    write_ready_file(
        ready_file, name=name, port=running.port, address=running.address, **running.ready_info
    )
    waiter = asyncio.ensure_future(running.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("%s stopping", name)
    await running.stop(grace_s)
    for task in (waiter, stopper):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # After the drain, so the spans of the last calls (and of the shutdown) are exported.
    await asyncio.to_thread(shutdown_tracing)
