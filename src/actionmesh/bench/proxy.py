"""A trivial grpc.aio pass-through proxy: the cost of one Python hop, and nothing else.

Every unary-unary method is forwarded as raw bytes (no deserialization) to one
target over one shared channel, with the caller's metadata and remaining
deadline; the target's status, details and trailers come back unchanged. No
interceptors, no tracing, no health service: the bare-hop mode measures the
floor any Python gateway sits on. ``python -m actionmesh.bench.proxy --target
HOST:PORT --ready-file F`` runs it as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from actionmesh.rpc.server import write_ready_file

# Per-connection headers gRPC sets itself; forwarding them would be refused.
_HOP_BY_HOP = frozenset(
    {"user-agent", "grpc-timeout", "te", "content-type", "grpc-accept-encoding"}
)

RawHandler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class PassThrough(grpc.GenericRpcHandler):
    """Forwards any unary-unary call to ``channel`` untouched."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = grpc.unary_unary_rpc_method_handler(self._forwarder(method))
            self._handlers[method] = handler
        return handler

    def _forwarder(self, method: str) -> RawHandler:
        # No serializers: requests and responses stay bytes end to end.
        call = self._channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = tuple(
                (key, value)
                for key, value in (context.invocation_metadata() or ())
                if key not in _HOP_BY_HOP
            )
            try:
                response: bytes = await call(
                    request, metadata=metadata, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await context.abort(
                    exc.code(), exc.details() or "", exc.trailing_metadata() or None
                )
            return response

        return forward


async def start_proxy(
    target: str, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, grpc.aio.Channel, int]:
    """Start the proxy; returns the server, its upstream channel and the bound port."""
    channel = grpc.aio.insecure_channel(target)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((PassThrough(channel),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    return server, channel, bound


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server, channel, port = await start_proxy(args.target, args.host, args.port)
    write_ready_file(args.ready_file, name="proxy", port=port, address=f"{args.host}:{port}")
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        with contextlib.suppress(Exception):
            await channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m actionmesh.bench.proxy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--target", required=True, help="host:port to forward every call to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", help="where to write {pid, port, address} once serving")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
