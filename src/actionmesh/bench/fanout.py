"""Providers for the DiscoverActions fan-out benchmark, many in one process.

Provider ``fan-NN`` declares one action ``fanNN.look`` with the SDK; its Discover
answers after ``--delay-ms`` (an asynchronous wait, as a provider calling its own
backend would). Record type ``fanK`` is handled by the first K providers of the
largest size, so a DiscoverActions on ``fanK`` fans out to exactly K providers;
``fanhang`` is handled by all of them plus ``fan-hang``, whose Discover never
answers (the gateway's per-provider deadline must cut it off).

Each provider is a real gRPC server built by the SDK's pieces (the servicer,
``start_server`` with health and interceptors, ``RegistryLink`` registration
with a lease), one port each. ``python -m actionmesh.bench.fanout --registry
HOST:PORT --sizes 1,8,32 --first 0 --last 16 --hang true`` serves providers
``first..last-1`` (so the set can be split across processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc.aio

from actionmesh.rpc.server import RunningServer, configure_logging, start_server, write_ready_file
from actionmesh.sdk import ActionContext, NoInputs, Provider, RegistryLink, Result, Risk
from actionmesh.sdk.servicer import ActionProviderServicer
from actionmesh.v1 import provider_pb2, provider_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = provider_pb2.DESCRIPTOR.services_by_name["ActionProviderService"].full_name
HANG_RECORD_TYPE = "fanhang"
HANG_PROVIDER_ID = "fan-hang"


def record_type(size: int) -> str:
    """The record type whose discovery fans out to ``size`` providers."""
    return f"fan{size}"


def provider_id(index: int) -> str:
    return f"fan-{index:02d}"


class DelayedServicer(ActionProviderServicer):
    """The SDK servicer, with Discover taking ``delay_s`` (or forever when ``hang``)."""

    def __init__(self, provider: Provider, delay_s: float, *, hang: bool = False) -> None:
        super().__init__(provider, None)
        self._delay_s = delay_s
        self._hang = hang

    async def Discover(
        self, request: provider_pb2.DiscoverRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DiscoverResponse:
        if self._hang:
            # Until the caller's deadline cancels this call.
            await asyncio.Event().wait()
        await asyncio.sleep(self._delay_s)
        return await super().Discover(request, context)


async def _look(ctx: ActionContext, inputs: NoInputs) -> Result:
    """Nothing to do: only discovery is measured."""
    return Result.succeeded()


def build_provider(pid: str, action_id: str, record_types: list[str]) -> Provider:
    provider = Provider(pid, version="1.0.0")
    provider.action(action_id, record_types=record_types, label="Look", risk=Risk.LOW)(_look)
    provider.check()
    return provider


@dataclass
class Served:
    provider: Provider
    running: RunningServer
    link: RegistryLink


async def serve_one(
    provider: Provider, servicer: ActionProviderServicer, registry: str, host: str
) -> Served:
    running = await start_server(
        [(provider_pb2_grpc.add_ActionProviderServiceServicer_to_server, servicer, SERVICE_NAME)],
        host=host,
        port=0,
    )
    link = RegistryLink(
        target=registry,
        provider_id=provider.id,
        version=provider.version,
        endpoint=f"{host}:{running.port}",
        actions=[a.descriptor() for a in provider.actions.values()],
    )
    link.start()
    return Served(provider, running, link)


def planned(
    sizes: list[int], first: int, last: int, hang: bool
) -> list[tuple[str, str, list[str]]]:
    """(provider id, action id, record types) of the providers this process serves."""
    largest = max(sizes)
    plan = []
    for index in range(first, min(last, largest)):
        types = [record_type(size) for size in sorted(sizes) if index < size]
        plan.append((provider_id(index), f"fan{index:02d}.look", [*types, HANG_RECORD_TYPE]))
    if hang:
        plan.append((HANG_PROVIDER_ID, "fanhang.look", [HANG_RECORD_TYPE]))
    return plan


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    hang = args.hang.lower() in ("1", "true", "yes")
    served: list[Served] = []
    try:
        for pid, action_id, types in planned(sizes, args.first, args.last, hang):
            provider = build_provider(pid, action_id, types)
            servicer = DelayedServicer(
                provider, args.delay_ms / 1000.0, hang=pid == HANG_PROVIDER_ID
            )
            served.append(await serve_one(provider, servicer, args.registry, args.host))
        await asyncio.wait_for(
            asyncio.gather(*(s.link.registered.wait() for s in served)), timeout=30.0
        )
        first = served[0].running
        write_ready_file(
            args.ready_file,
            name="fanout",
            port=first.port,
            address=first.address,
            providers=[s.provider.id for s in served],
        )
        log.info("%d fan-out providers registered", len(served))
        await stop.wait()
    finally:
        await asyncio.gather(*(s.link.stop(2.0) for s in served), return_exceptions=True)
        for s in served:
            with contextlib.suppress(Exception):
                await s.running.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m actionmesh.bench.fanout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--registry", required=True, help="registry host:port")
    parser.add_argument("--sizes", default="1,8,32", help="fan-out sizes, comma-separated")
    parser.add_argument("--first", type=int, default=0, help="first provider index served here")
    parser.add_argument("--last", type=int, default=1 << 30, help="one past the last index")
    parser.add_argument("--hang", default="true", help="also serve the hanging provider")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="Discover delay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ready-file", help="written once every provider is registered")
    configure_logging()
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
