"""Wiring of the gateway process: the same start_gateway serves binaries and tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from actionmesh.gateway.admission import Admission
from actionmesh.gateway.approvals import Approvals
from actionmesh.gateway.auth import TokenVerifier
from actionmesh.gateway.authorization import Authorizer
from actionmesh.gateway.claims import Claims
from actionmesh.gateway.config import GatewayConfig, parse_trusted_callers
from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.discovery import Discoverer
from actionmesh.gateway.dispatch import Deadlines, Dispatcher
from actionmesh.gateway.execution import Executor
from actionmesh.gateway.facts import FactResolver
from actionmesh.gateway.history import HistoryReader
from actionmesh.gateway.interventions import Interventions
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.metrics import observe_gateway
from actionmesh.gateway.notifications import NotificationRouter
from actionmesh.gateway.notifier import NotificationLog, Notifier, NotifierSettings
from actionmesh.gateway.outbox import OutboxShipper
from actionmesh.gateway.policy import PolicyEngine
from actionmesh.gateway.previews import Previews
from actionmesh.gateway.reconciler import Reconciler, ReconcileSettings
from actionmesh.gateway.redaction import Redactor
from actionmesh.gateway.servicer import GatewayServicer
from actionmesh.gateway.storage import GatewayStore
from actionmesh.gateway.sweeper import Sweeper
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.rpc.supervisor import Supervisor
from actionmesh.runtime.db import database_unavailable
from actionmesh.runtime.metrics import expose_metrics
from actionmesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["ActionGatewayService"].full_name
# grpc.health.v1 service name that is NOT_SERVING while the policy file on disk
# failed to load (the previous policies stay in force; GetPolicyStatus says why).
POLICY_HEALTH_NAME = "actionmesh.gateway.policy"


async def start_gateway(config: GatewayConfig) -> RunningServer:
    verifier = TokenVerifier(config)
    policy = PolicyEngine(config.policy_file)
    # A bad notifications file stops the start with the entry and field it is about.
    router = NotificationRouter.from_file(config.notifications_file)
    store = await asyncio.to_thread(
        GatewayStore, config.database_url, migrate=config.migrate_on_start
    )
    store.notifications = router
    # Every background loop of the gateway runs under this supervisor: restarted when
    # it fails, and the gateway NOT_SERVING while one keeps failing.
    supervisor = Supervisor("gateway")
    writer = GroupCommitWriter(store)
    writer.start(supervisor)
    directory = ProviderDirectory(
        config.registry,
        tls=config.tls,
        retire_grace_s=config.max_execute_timeout_s + config.late_result_grace_s,
    )
    directory.start(supervisor)
    if not await directory.wait_synced(5.0):
        log.warning("registry %s not reachable yet; discovery starts empty", config.registry)
    # One channel to the audit log serves both the outbox shipper and history reads.
    audit_channel = open_channel(config.auditlog, config.tls)
    shipper = OutboxShipper(
        store,
        writer,
        audit_channel,
        batch_size=config.audit_batch_size,
        retry_max_s=config.audit_retry_max_s,
        linger_s=config.audit_linger_s,
    )
    shipper.start(supervisor)
    admission = Admission.from_settings(
        config.tenant_rate_limit,
        config.tenant_max_concurrent_executions,
        config.provider_max_concurrent_executions,
    )
    notifier = Notifier(
        store,
        writer,
        router,
        NotifierSettings(
            poll_interval_s=config.notification_poll_interval_s,
            timeout_s=config.notification_timeout_s,
            retry_initial_s=config.notification_retry_initial_s,
            retry_max_s=config.notification_retry_max_s,
            max_attempts=config.notification_max_attempts,
            max_age_s=config.notification_max_age_s,
            lease_s=config.notification_lease_s,
            retention_s=config.notification_retention_s,
        ),
    )

    def on_audit_written() -> None:
        shipper.notify()
        notifier.wake()

    core = GatewayCore.build(config, store, writer, directory, policy, on_audit_written, admission)
    # Executions a previous run of this (or another) gateway left RUNNING and past their
    # deadline are closed now, not one sweep interval later.
    try:
        await core.sweeper.resolve_orphans()
    except Exception:
        log.exception("start-up orphan sweep failed; the periodic sweep retries")
    servicer = GatewayServicer(
        verifier=verifier,
        discoverer=core.discoverer,
        executor=core.executor,
        approvals=core.approvals,
        interventions=core.interventions,
        history=HistoryReader(audit_channel),
        ledger=core.ledger,
        policy=policy,
        admission=admission,
        notification_log=NotificationLog(store, config.notification_log_role_set),
    )
    running = await start_server(
        [(gateway_pb2_grpc.add_ActionGatewayServiceServicer_to_server, servicer, SERVICE_NAME)],
        host=config.host,
        error_translators=[database_unavailable],
        port=config.port,
        max_receive_bytes=config.max_request_bytes,
        tls=config.tls,
        require_client_cert=config.tls_require_client_cert,
    )
    await running.health.set(POLICY_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
    observe_gateway(running, store, directory)
    expose_metrics(
        running, host=config.host, port=config.metrics_port, service_name="actionmesh-gateway"
    )
    background = [
        supervisor.every(
            "approval-expiry", config.approval_sweep_interval_s, core.sweeper.expire_due
        ),
        supervisor.every(
            "orphan-sweep", config.approval_sweep_interval_s, core.sweeper.resolve_orphans
        ),
        supervisor.spawn("reconcile", core.reconciler.run),
        # Runs with no subscriptions too: deliveries a previous configuration left are
        # still due (and fail as "no longer configured", in the log).
        supervisor.spawn("notifications", notifier.run),
    ]
    if verifier.refresh_interval_s is not None:
        # Re-reads a JWKS so removed keys stop working.
        background.append(
            supervisor.every("jwks-refresh", verifier.refresh_interval_s, verifier.refresh_keys)
        )
    if config.policy_reload_interval_s > 0 and config.notifications_file:
        # Subscriptions and their secrets change without a restart (a bad file never
        # replaces a good one).
        background.append(
            supervisor.every(
                "notifications-reload",
                config.policy_reload_interval_s,
                lambda: asyncio.to_thread(router.reload_if_changed),
            )
        )
    if config.policy_reload_interval_s > 0:
        background.append(
            supervisor.every(
                "policy-reload",
                config.policy_reload_interval_s,
                lambda: reload_policy(policy, running),
            )
        )
    await running.supervise(supervisor)

    async def stop_background() -> None:
        for loop in background:
            await loop.stop()

    async def close_dependencies() -> None:
        await core.dispatcher.close()
        await shipper.close()
        await writer.close()
        await directory.close()
        await audit_channel.close()
        store.close()

    running.on_stop.append(stop_background)
    running.after_drain.append(close_dependencies)
    return running


@dataclass(frozen=True)
class GatewayCore:
    """The gateway's execution core, wired once: who authorizes, claims, dispatches,
    writes and sweeps (see actionmesh.gateway.execution for the map)."""

    ledger: Ledger
    authorizer: Authorizer
    dispatcher: Dispatcher
    sweeper: Sweeper
    reconciler: Reconciler
    executor: Executor
    approvals: Approvals
    interventions: Interventions
    discoverer: Discoverer

    @classmethod
    def build(
        cls,
        config: GatewayConfig,
        store: GatewayStore,
        writer: GroupCommitWriter,
        directory: ProviderDirectory,
        policy: PolicyEngine,
        on_audit_written: Callable[[], None],
        admission: Admission,
    ) -> GatewayCore:
        deadlines = Deadlines(
            default_timeout_s=config.default_execute_timeout_s,
            max_timeout_s=config.max_execute_timeout_s,
            late_result_grace_s=config.late_result_grace_s,
            poll_interval_s=config.long_running_poll_interval_s,
            max_run_s=config.long_running_max_duration_s,
        )
        ledger = Ledger(
            store, writer, Redactor.from_key_file(config.redaction_key_file), on_audit_written
        )
        authorizer = Authorizer(policy)
        facts = FactResolver(
            directory,
            parse_trusted_callers(config.trusted_callers),
            timeout_s=config.record_source_timeout_s,
            cache_ttl_s=config.record_facts_cache_ttl_s,
        )
        dispatcher = Dispatcher(directory, ledger, deadlines)
        sweeper = Sweeper(ledger, dispatcher, deadlines)
        reconciler = Reconciler(
            ledger,
            directory,
            ReconcileSettings(
                interval_s=config.reconcile_interval_s,
                max_backoff_s=config.reconcile_max_backoff_s,
                max_attempts=config.reconcile_max_attempts,
                max_age_s=config.reconcile_max_age_s,
                status_timeout_s=config.reconcile_status_timeout_s,
                lease_s=config.reconcile_lease_s,
                poll_interval_s=config.long_running_poll_interval_s,
            ),
        )
        dispatcher.on_accepted = reconciler.wake
        claims = Claims(
            ledger,
            dispatcher,
            sweeper,
            deadlines,
            approval_ttl_s=config.approval_ttl_s,
            reconciler=reconciler,
        )
        return cls(
            ledger=ledger,
            authorizer=authorizer,
            dispatcher=dispatcher,
            sweeper=sweeper,
            reconciler=reconciler,
            executor=Executor(
                directory=directory,
                facts=facts,
                authorizer=authorizer,
                admission=admission,
                claims=claims,
                dispatcher=dispatcher,
                ledger=ledger,
                previews=Previews(directory, deadlines),
            ),
            approvals=Approvals(
                directory=directory,
                facts=facts,
                authorizer=authorizer,
                ledger=ledger,
                dispatcher=dispatcher,
                sweeper=sweeper,
                deadlines=deadlines,
            ),
            interventions=Interventions(
                directory=directory,
                facts=facts,
                authorizer=authorizer,
                ledger=ledger,
                reconciler=reconciler,
            ),
            discoverer=Discoverer(
                directory,
                authorizer,
                config.discover_timeout_s,
                facts=facts,
                ledger=ledger,
                cache_ttl_s=config.discover_cache_ttl_s,
                cache_max_entries=config.discover_cache_max_entries,
            ),
        )


async def reload_policy(policy: PolicyEngine, running: RunningServer) -> None:
    """Reload the policy file if it changed; a bad file never replaces a good one."""
    changed = await asyncio.to_thread(policy.reload_if_changed)
    healthy = not policy.status().reload_error
    await running.health.set(
        POLICY_HEALTH_NAME,
        health_pb2.HealthCheckResponse.SERVING
        if healthy
        else health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    if changed is not None:
        log.info("policy reload: %s", "loaded" if changed else "refused")
