"""``python -m actionmesh.registry``: run RegistryService until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from actionmesh.registry.config import ENV_PREFIX, RegistryConfig
from actionmesh.registry.server import start_registry
from actionmesh.rpc.config import load_config
from actionmesh.rpc.server import configure_logging, run_service
from actionmesh.rpc.telemetry import configure_process_tracing


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    configure_process_tracing("actionmesh-registry")
    cfg = load_config(RegistryConfig, env_prefix=ENV_PREFIX, argv=argv)
    asyncio.run(
        run_service(lambda: start_registry(cfg), name="registry", ready_file=cfg.ready_file)
    )


if __name__ == "__main__":
    main()
