"""Running a provider: :func:`start_provider` (tests, embedding) and :func:`serve` (binaries)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from actionmesh.rpc.config import load_config, sqlite_path
from actionmesh.rpc.server import RunningServer, configure_logging, run_service, start_server
from actionmesh.rpc.supervisor import Supervisor
from actionmesh.rpc.telemetry import configure_process_tracing
from actionmesh.sdk.config import ENV_PREFIX, ProviderConfig
from actionmesh.sdk.dedupe import IdempotencyStore, SqliteIdempotencyStore
from actionmesh.sdk.inputs import ProviderDefinitionError
from actionmesh.sdk.provider import Provider
from actionmesh.sdk.registration import RegistryLink
from actionmesh.sdk.servicer import ActionProviderServicer
from actionmesh.v1 import provider_pb2, provider_pb2_grpc

log = logging.getLogger("actionmesh.sdk")

SERVICE_NAME = provider_pb2.DESCRIPTOR.services_by_name["ActionProviderService"].full_name
# Completed idempotency records older than this are forgotten at start.
IDEMPOTENCY_RETENTION_S = 7 * 24 * 3600.0


class OwnedStore(IdempotencyStore, Protocol):
    """An idempotency store the SDK opened for ``dedupe=True`` and so prunes and closes."""

    def prune(self, older_than_s: float) -> int: ...

    def close(self) -> None: ...


def open_idempotency_store(url: str, *, stale_claim_s: float = 300.0) -> OwnedStore:
    """The store of ``dedupe=True``: the SQLite file of ``url`` through the standard
    library, or any other database through SQLAlchemy (the ``sql`` extra)."""
    if sqlite_path(url) is not None:
        return SqliteIdempotencyStore.open(url, stale_claim_s=stale_claim_s)
    try:
        from actionmesh.sdk.sqlstore import SqlIdempotencyStore
    except ImportError:
        raise ProviderDefinitionError(
            f"dedupe=True on a {url.split(':', 1)[0]} database needs SQLAlchemy: install "
            "actionmesh-sdk[sql], or pass dedupe=YOUR_STORE (an IdempotencyStore)"
        ) from None
    return SqlIdempotencyStore.open(url, stale_claim_s=stale_claim_s)


async def _run_stop_hooks(provider: Provider) -> None:
    for hook in reversed(provider.stop_hooks):
        try:
            await hook()
        except Exception:
            log.exception("on_stop hook %s of %s failed", hook.__qualname__, provider.id)


async def start_provider(provider: Provider, config: ProviderConfig | None = None) -> RunningServer:
    """Open the provider's state, serve it, and keep it registered.

    In order: the idempotency store (``dedupe=True``), the ``on_start`` hooks,
    the gRPC server (ActionProviderService, health, reflection), then — when
    ``config.registry`` is set — registration in the background with lease
    renewal. ``RunningServer.stop()`` refuses new executions, deregisters
    (bounded by ``deregister_timeout_s``), lets running executions finish
    (``drain_timeout_s``), runs the ``on_stop`` hooks and closes the store.
    While running, ``provider.registration`` is the :class:`RegistryLink`.
    """
    config = config or ProviderConfig()
    provider.check()
    if provider.running:
        raise ProviderDefinitionError(f"provider {provider.id} is already running in this process")
    provider.running = True
    owned_store: OwnedStore | None = None
    try:
        store: IdempotencyStore | None = None
        if provider.dedupe is True:
            owned_store = await asyncio.to_thread(
                open_idempotency_store,
                config.database_url_for(provider.id),
                stale_claim_s=config.dedupe_stale_claim_s,
            )
            await asyncio.to_thread(owned_store.prune, IDEMPOTENCY_RETENTION_S)
            store = owned_store
        elif provider.dedupe is not False:
            store = provider.dedupe
        for hook in provider.start_hooks:
            await hook(config)
        servicer = ActionProviderServicer(
            provider, store, max_long_running=config.max_long_running_executions
        )
        running = await start_server(
            [
                (
                    provider_pb2_grpc.add_ActionProviderServiceServicer_to_server,
                    servicer,
                    SERVICE_NAME,
                )
            ],
            host=config.host,
            port=config.port,
            tls=config.tls,
        )
    except BaseException:
        await _run_stop_hooks(provider)
        if owned_store is not None:
            owned_store.close()
        provider.running = False
        raise

    supervisor = Supervisor(f"provider {provider.id}")
    link: RegistryLink | None = None
    if config.registry:
        link = RegistryLink(
            target=config.registry,
            provider_id=provider.id,
            version=provider.version,
            endpoint=config.endpoint(running.port),
            actions=[a.descriptor() for a in provider.actions.values()],
            record_sources=sorted(provider.record_sources),
            max_backoff_s=config.registry_retry_max_s,
            tls=config.tls,
            token=config.registration_token_value(),
        )
        link.start(supervisor)
    await running.supervise(supervisor)
    provider.registration = link

    stopped = False

    async def shutdown() -> None:
        nonlocal stopped
        if stopped:  # RunningServer.stop() may be called more than once
            return
        stopped = True
        try:
            # Deregister while draining: the gateway stops routing here as soon as
            # possible, and executions already running still finish.
            deregistered = (
                asyncio.create_task(link.stop(config.deregister_timeout_s)) if link else None
            )
            await servicer.drain(config.drain_timeout_s)
            if deregistered is not None:
                await deregistered
        finally:
            await _run_stop_hooks(provider)
            if owned_store is not None:
                await asyncio.to_thread(owned_store.close)
            provider.registration = None
            provider.running = False

    running.on_stop.append(shutdown)
    log.info(
        "provider %s %s serving %d action(s) on port %d",
        provider.id,
        provider.version,
        len(provider.actions),
        running.port,
    )
    return running


def serve(provider: Provider, argv: Sequence[str] | None = None) -> None:
    """The provider binary: read config, serve until SIGTERM/SIGINT, deregister, drain."""
    configure_logging()
    configure_process_tracing(f"actionmesh-provider-{provider.id}")
    config = load_config(
        ProviderConfig,
        env_prefix=ENV_PREFIX,
        argv=argv,
        description=f"actionmesh provider {provider.id} {provider.version}",
    )
    asyncio.run(
        run_service(
            lambda: start_provider(provider, config),
            name=f"provider {provider.id}",
            ready_file=config.ready_file,
            grace_s=config.drain_timeout_s,
        )
    )
