"""``python -m actionmesh.auditlog``: run the AuditService until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.rpc.config import load_config
from actionmesh.rpc.server import configure_logging, run_service
from actionmesh.rpc.telemetry import configure_process_tracing


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    configure_process_tracing("actionmesh-auditlog")
    cfg = load_config(AuditLogConfig, env_prefix="ACTIONMESH_AUDITLOG", argv=argv)
    asyncio.run(
        run_service(lambda: start_auditlog(cfg), name="auditlog", ready_file=cfg.ready_file)
    )


if __name__ == "__main__":
    main()
