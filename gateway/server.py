"""Wiring of the gateway process: the same start_gateway serves binaries and tests."""

from __future__ import annotations

import asyncio
import logging

from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.auth import TokenVerifier
from gateway.config import GatewayConfig
from gateway.directory import ProviderDirectory
from gateway.discovery import Discoverer
from gateway.execution import Executor
from gateway.history import HistoryReader
from gateway.outbox import OutboxShipper
from gateway.policy import PolicyEngine
from gateway.servicer import GatewayServicer
from gateway.storage import GatewayStore

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["ActionGatewayService"].full_name


async def start_gateway(config: GatewayConfig) -> RunningServer:
    verifier = TokenVerifier(config)
    policy = PolicyEngine(config.policy_file)
    store = await asyncio.to_thread(GatewayStore, config.database_url)
    directory = ProviderDirectory(config.registry)
    directory.start()
    if not await directory.wait_synced(5.0):
        log.warning("registry %s not reachable yet; discovery starts empty", config.registry)
    # One channel to the audit log serves both the outbox shipper and history reads.
    audit_channel = open_channel(config.auditlog)
    shipper = OutboxShipper(
        store,
        audit_channel,
        batch_size=config.audit_batch_size,
        retry_max_s=config.audit_retry_max_s,
    )
    shipper.start()
    servicer = GatewayServicer(
        verifier=verifier,
        discoverer=Discoverer(directory, policy, config.discover_timeout_s),
        executor=Executor(
            store=store,
            directory=directory,
            policy=policy,
            on_audit_written=shipper.notify,
            default_timeout_s=config.default_execute_timeout_s,
            max_timeout_s=config.max_execute_timeout_s,
        ),
        history=HistoryReader(audit_channel),
        store=store,
    )
    running = await start_server(
        [(gateway_pb2_grpc.add_ActionGatewayServiceServicer_to_server, servicer, SERVICE_NAME)],
        host=config.host,
        port=config.port,
    )

    async def close_dependencies() -> None:
        await shipper.close()
        await directory.close()
        await audit_channel.close()
        store.close()

    running.on_stop.append(close_dependencies)
    return running
