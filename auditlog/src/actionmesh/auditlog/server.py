"""Wires the audit log: engine, schema, repository, servicer, gRPC server."""

from __future__ import annotations

import asyncio

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.events import AuditLog
from actionmesh.auditlog.servicer import AuditServicer
from actionmesh.auditlog.storage import AuditRepository
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.runtime.db import database_unavailable, make_engine
from actionmesh.runtime.metrics import expose_metrics
from actionmesh.v1 import audit_pb2, audit_pb2_grpc

SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


async def start_auditlog(config: AuditLogConfig) -> RunningServer:
    """Start AuditService on ``config.host:config.port``; stopping it closes the database."""
    repository = AuditRepository(make_engine(config.database_url))
    try:
        await asyncio.to_thread(repository.create_schema, migrate=config.migrate_on_start)
        running = await start_server(
            [
                (
                    audit_pb2_grpc.add_AuditServiceServicer_to_server,
                    AuditServicer(AuditLog(repository)),
                    SERVICE_NAME,
                )
            ],
            host=config.host,
            error_translators=[database_unavailable],
            port=config.port,
            max_receive_bytes=config.max_request_bytes,
            tls=config.tls,
        )
    except BaseException:
        repository.close()
        raise

    async def close_database() -> None:
        # Calls still draining keep the connections they hold; dispose only drops the pool.
        await asyncio.to_thread(repository.close)

    running.on_stop.append(close_database)
    expose_metrics(
        running, host=config.host, port=config.metrics_port, service_name="actionmesh-auditlog"
    )
    return running
