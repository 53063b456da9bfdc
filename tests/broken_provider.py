"""A deliberately broken provider, written without the SDK, for the conformance kit's tests.

A raw grpc.aio ActionProviderServiceServicer whose flaws can be switched on one
by one. With the default flaws it has no health service, answers Discover with an
undeclared action and a changing reason, executes unknown actions, accepts any
inputs and tenant, needs no idempotency key, acts again on a repeated key,
refuses with bare statuses and has no GetExecutionStatus (UNIMPLEMENTED, as a server
without the method answers). With ``Flaws.none()`` it honours the contract, which
shows the kit passes providers not written with the SDK; the ``status_*`` flaws
break one rule of GetExecutionStatus each.

It is the system of record of nothing unless started with a :class:`Source`: then
it declares ``thing`` records in ``record_sources`` and answers ResolveRecord for
:data:`THINGS`, with the source flaws the Source switches on (flaws the SDK would
not let a provider have).

It has no preview (Preview UNIMPLEMENTED, as a server without the method answers)
unless started with :class:`Previews`: then its action is previewable and Preview
answers what a poke would change, with the preview flaws the Previews switch on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from actionmesh.rpc.errors import (
    ActionMeshError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from actionmesh.rpc.schema import validate_inputs
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

ACTION_ID = "thing.poke"
RECORD_TYPE = "thing"
# Records with this status are eligible for ACTION_ID.
READY = "ready"
# The things the provider holds as their system of record: (tenant, id) -> (status, version).
THINGS = {("acme", "t-1"): (READY, "7"), ("globex", "t-9"): (READY, "2")}


@dataclass(frozen=True)
class Flaws:
    """Which contract rules the broken provider breaks."""

    no_health: bool = True
    bad_describe: bool = False
    undeclared_discover: bool = True
    unstable_discover: bool = True
    executes_unknown_actions: bool = True
    no_validation: bool = True
    ignores_tenant: bool = True
    acts_twice: bool = True
    bare_errors: bool = True
    # GetExecutionStatus: not there at all (UNIMPLEMENTED, no details).
    no_status: bool = True
    # Looks executions up by idempotency key alone: another tenant's key is answered.
    status_ignores_tenant: bool = False
    # Answers a finished execution with another external ref than Execute gave.
    status_misreports: bool = False
    # Answers the same question differently after the first time.
    status_unstable: bool = False
    # Answers RUNNING for a key it never received.
    status_makes_up_keys: bool = False

    @classmethod
    def none(cls) -> Flaws:
        return cls(**{name: False for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Source:
    """The provider as the system of record of things, and how its answers are wrong."""

    # What Describe.record_sources declares.
    declares: tuple[str, ...] = (RECORD_TYPE,)
    # Answers a record without a version.
    unversioned: bool = False
    # Answers another record than the one asked for (a gadget with its own id): no echo.
    misdirected: bool = False


@dataclass(frozen=True)
class Previews:
    """The provider's action as previewable, and how its previews are wrong."""

    # A Preview pokes the thing (a write): the state, and so the digest, moves each time.
    writes: bool = False
    # The digest carries a counter of the Previews asked: never the same twice.
    unstable: bool = False
    # The preview shows another change than the poke makes (off by one).
    mismatched: bool = False
    # Describe does not say the action is previewable, yet Preview answers.
    undeclared: bool = False


def _descriptor(
    action_id: str = ACTION_ID, previewable: bool = False
) -> common_pb2.ActionDescriptor:
    return common_pb2.ActionDescriptor(
        previewable=previewable,
        action_id=action_id,
        label="Poke a thing",
        record_types=[RECORD_TYPE],
        inputs=[
            common_pb2.InputField(
                name="reason",
                type=common_pb2.INPUT_TYPE_STRING,
                required=True,
                min_length=3,
                max_length=50,
            ),
            common_pb2.InputField(
                name="times",
                type=common_pb2.INPUT_TYPE_INTEGER,
                required=False,
                minimum=1,
                maximum=5,
            ),
        ],
        risk=common_pb2.RISK_LOW,
    )


class BrokenServicer(provider_pb2_grpc.ActionProviderServiceServicer):
    """Breaks the contract as its :class:`Flaws` say."""

    def __init__(
        self, flaws: Flaws, source: Source | None = None, previews: Previews | None = None
    ) -> None:
        self.flaws = flaws
        self.source = source
        self.previews = previews
        # How many pokes acted so far (the state a preview reads).
        self.poked = 0
        self.preview_asks = itertools.count(1)
        self.pokes = itertools.count(1)
        self.discovers = itertools.count(1)
        # Idempotency keys of the executions that really acted, in order.
        self.executed: list[str] = []
        self.done: dict[str, provider_pb2.ExecuteResponse] = {}
        # Every answer given, by (tenant, action, key): what GetExecutionStatus reports.
        self.answers: dict[tuple[str, str, str], provider_pb2.ExecuteResponse] = {}
        self.status_asks = itertools.count(1)

    async def Describe(
        self, request: provider_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DescribeResponse:
        previewable = self.previews is not None and not self.previews.undeclared
        actions = [_descriptor(previewable=previewable)]
        if self.flaws.bad_describe:
            bad_schema = _descriptor("Not An Id")
            bad_schema.inputs[0].min_length = 60  # more than max_length 50
            actions += [_descriptor(), bad_schema]
        return provider_pb2.DescribeResponse(
            provider_id="broken",
            version="" if self.flaws.bad_describe else "0.0.1",
            actions=actions,
            record_sources=list(self.source.declares) if self.source else [],
        )

    async def ResolveRecord(
        self, request: provider_pb2.ResolveRecordRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.ResolveRecordResponse:
        if self.source is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a record source")
        try:
            return self._resolve(request)
        except ActionMeshError as exc:
            await context.abort_with_status(rpc_status.to_status(exc.to_status()))
            raise  # unreachable: abort raises

    def _resolve(
        self, request: provider_pb2.ResolveRecordRequest
    ) -> provider_pb2.ResolveRecordResponse:
        assert self.source is not None
        if request.record.type != RECORD_TYPE:
            raise NotFound("not the source of that type", reason="RECORD_TYPE_NOT_SOURCED")
        found = THINGS.get((request.tenant, request.record.id))
        if found is None:
            raise NotFound("no such thing in this tenant", reason="RECORD_NOT_FOUND")
        status, version = found
        record = common_pb2.RecordContext(
            tenant=request.tenant,
            type=RECORD_TYPE,
            id=request.record.id,
            status=status,
            sensitivity=common_pb2.SENSITIVITY_NORMAL,
            attributes={"colour": "blue"},
            version="" if self.source.unversioned else version,
        )
        if self.source.misdirected:
            record.type, record.id = "gadget", f"g-{version}"
        return provider_pb2.ResolveRecordResponse(record=record)

    async def Discover(
        self, request: provider_pb2.DiscoverRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DiscoverResponse:
        if request.record.status == READY:
            found = [provider_pb2.DiscoveredAction(action_id=ACTION_ID, available=True)]
        else:
            # With the flaw, a counter in the reason: the answer changes on every call.
            reason = f"BUSY_{next(self.discovers)}" if self.flaws.unstable_discover else "NOT_READY"
            found = [
                provider_pb2.DiscoveredAction(
                    action_id=ACTION_ID, available=False, unavailable_reason=reason
                )
            ]
        if self.flaws.undeclared_discover:
            found.append(provider_pb2.DiscoveredAction(action_id="thing.ghost", available=True))
        return provider_pb2.DiscoverResponse(actions=found)

    async def Execute(
        self, request: provider_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.ExecuteResponse:
        try:
            return self._execute(request)
        except ActionMeshError as exc:
            if self.flaws.bare_errors:
                # A bare status: no google.rpc.Status details, so no ErrorInfo reason.
                await context.abort(exc.code, exc.message)
            await context.abort_with_status(rpc_status.to_status(exc.to_status()))
            raise  # unreachable: abort raises

    def _execute(self, request: provider_pb2.ExecuteRequest) -> provider_pb2.ExecuteResponse:
        flaws = self.flaws
        if request.action_id != ACTION_ID and not flaws.executes_unknown_actions:
            raise NotFound("no such action", reason="UNKNOWN_ACTION")
        if not flaws.no_validation:
            if not request.idempotency_key:
                raise InvalidArgument(
                    "idempotency key required",
                    reason="MISSING_IDEMPOTENCY_KEY",
                    violations=[FieldViolation("idempotency_key", "is required")],
                )
            validate_inputs(_descriptor().inputs, request.inputs)
        if request.operator.tenant != request.record.tenant and not flaws.ignores_tenant:
            raise PermissionDenied("another tenant's record", reason="TENANT_MISMATCH")
        key = request.idempotency_key
        if not flaws.acts_twice and key in self.done:
            return self.done[key]
        poke = next(self.pokes)
        self.poked = poke
        self.executed.append(key)
        reply = provider_pb2.ExecuteResponse(
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            external_ref=f"poke-{poke}",
            changes=[common_pb2.FieldChange(field="pokes", before=str(poke - 1), after=str(poke))],
        )
        self.done[key] = reply
        self.answers[(request.record.tenant, request.action_id, key)] = reply
        return reply

    async def Preview(
        self, request: provider_pb2.PreviewRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.PreviewResponse:
        previews = self.previews
        if previews is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
            raise AssertionError("unreachable: abort raises")
        if request.action_id != ACTION_ID:
            error = NotFound("no such action", reason="UNKNOWN_ACTION")
            await context.abort_with_status(rpc_status.to_status(error.to_status()))
        if previews.writes:
            self.poked = next(self.pokes)  # a Preview must not act, but this one does
        now = self.poked
        after = now + (2 if previews.mismatched else 1)
        digest = f"pokes-{now}"
        if previews.unstable:
            digest += f"-{next(self.preview_asks)}"
        return provider_pb2.PreviewResponse(
            changes=[common_pb2.FieldChange(field="pokes", before=str(now), after=str(after))],
            effect=f"pokes thing {request.record.id} once more",
            state_digest=digest,
        )

    async def GetExecutionStatus(
        self, request: provider_pb2.GetExecutionStatusRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.GetExecutionStatusResponse:
        flaws = self.flaws
        if flaws.no_status:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        found = self.answers.get((request.tenant, request.action_id, request.idempotency_key))
        if found is None and flaws.status_ignores_tenant:
            found = next(
                (
                    reply
                    for (_, action_id, key), reply in self.answers.items()
                    if (action_id, key) == (request.action_id, request.idempotency_key)
                ),
                None,
            )
        if found is None:
            state = (
                provider_pb2.EXECUTION_STATE_RUNNING
                if flaws.status_makes_up_keys
                else provider_pb2.EXECUTION_STATE_NEVER_RECEIVED
            )
            return provider_pb2.GetExecutionStatusResponse(state=state)
        result = provider_pb2.ExecuteResponse()
        result.CopyFrom(found)
        if flaws.status_misreports:
            result.external_ref = "poke-0"
        if flaws.status_unstable and next(self.status_asks) > 1:
            result.external_ref += "-again"
        return provider_pb2.GetExecutionStatusResponse(
            state=provider_pb2.EXECUTION_STATE_FINISHED, result=result
        )


@dataclass
class BrokenServer:
    """The running broken provider."""

    server: grpc.aio.Server
    servicer: BrokenServicer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)


async def start_broken_provider(
    flaws: Flaws | None = None, source: Source | None = None, previews: Previews | None = None
) -> BrokenServer:
    """Serve the broken provider on 127.0.0.1 with a free port (a record source with
    ``source``, previewable with ``previews``)."""
    flaws = flaws or Flaws()
    server = grpc.aio.server()
    servicer = BrokenServicer(flaws, source, previews)
    provider_pb2_grpc.add_ActionProviderServiceServicer_to_server(servicer, server)
    if not flaws.no_health:
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return BrokenServer(server=server, servicer=servicer, port=port)
