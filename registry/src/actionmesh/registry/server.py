"""Wires the registry together: store, directory, servicer, background loops."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from actionmesh.registry.config import RegistryConfig
from actionmesh.registry.directory import Directory
from actionmesh.registry.health import GrpcHealthProber
from actionmesh.registry.metrics import observe_registry
from actionmesh.registry.servicer import SERVICE_NAME, RegistryServicer
from actionmesh.registry.storage import ProviderRepository
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.rpc.supervisor import Supervisor
from actionmesh.runtime.db import database_unavailable, make_engine
from actionmesh.runtime.metrics import expose_metrics
from actionmesh.v1 import registry_pb2_grpc


def expiry_period_s(lease_ttl_s: float) -> float:
    # Often enough that a lapsed lease is gone well within one more TTL.
    return min(1.0, lease_ttl_s / 4)


async def start_registry(config: RegistryConfig) -> RunningServer:
    """Start RegistryService and its lease-expiry and health loops."""
    engine = make_engine(config.database_url)
    prober = GrpcHealthProber(
        timeout_s=config.health_check_timeout_s,
        max_reconnect_backoff_s=config.health_check_interval_s,
        tls=config.tls,
    )
    directory = Directory(
        ProviderRepository(engine, migrate=config.migrate_on_start),
        prober,
        lease_ttl=timedelta(seconds=config.lease_ttl_s),
        allowed_endpoints=config.allowed_endpoint_list(),
    )
    try:
        await directory.open()
        running = await start_server(
            [
                (
                    registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                    RegistryServicer(
                        directory, require_credential=config.require_registration_credential
                    ),
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
        await directory.close()
        await asyncio.to_thread(engine.dispose)
        raise

    # Both passes run at a fixed rate under a supervisor: a pass that fails (the store
    # down, say) is retried after a backoff, and the registry reports NOT_SERVING
    # while one keeps failing.
    supervisor = Supervisor("registry")
    supervisor.every(
        "lease-expiry",
        expiry_period_s(config.lease_ttl_s),
        directory.expire_leases,
        first_after_s=0.0,
    )
    supervisor.every(
        "health-checks", config.health_check_interval_s, directory.check_health, first_after_s=0.0
    )
    await running.supervise(supervisor)

    async def stop_background() -> None:
        await supervisor.stop()
        # Ends watch streams now, so the server's drain does not wait out its grace.
        await directory.close()
        await asyncio.to_thread(engine.dispose)

    running.on_stop.append(stop_background)
    observe_registry(running, directory)
    expose_metrics(
        running, host=config.host, port=config.metrics_port, service_name="actionmesh-registry"
    )
    return running
