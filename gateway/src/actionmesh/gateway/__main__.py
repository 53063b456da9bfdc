"""python -m actionmesh.gateway: run the ActionGatewayService."""

from __future__ import annotations

import asyncio

from actionmesh.gateway.config import GatewayConfig
from actionmesh.gateway.server import start_gateway
from actionmesh.rpc.config import load_config
from actionmesh.rpc.server import configure_logging, run_service
from actionmesh.rpc.telemetry import configure_process_tracing


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    config = load_config(GatewayConfig, env_prefix="ACTIONMESH_GATEWAY", argv=argv)
    configure_process_tracing("actionmesh-gateway")
    asyncio.run(
        run_service(lambda: start_gateway(config), name="gateway", ready_file=config.ready_file)
    )


if __name__ == "__main__":
    main()
