"""A container health probe: ``python -m actionmesh.conformance.health HOST:PORT``.

Exits 0 when the grpc.health.v1 default service answers SERVING, 1 otherwise,
so a Dockerfile ``HEALTHCHECK`` needs no extra binary (grpc_health_probe).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, *, service: str = "", timeout_s: float = 3.0) -> bool:
    """Whether ``service`` at ``address`` is SERVING (False when unreachable)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actionmesh.conformance.health", description=__doc__.splitlines()[0]
    )
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help="service name (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    serving = is_serving(args.address, service=args.service, timeout_s=args.timeout)
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
