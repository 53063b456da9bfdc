"""Declaring a provider and its actions; every declaration is checked where it is made."""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from actionmesh.rpc.identifiers import ACTION_ID, PROVIDER_ID, RECORD_TYPE
from actionmesh.rpc.schema import schema_problems
from actionmesh.sdk.dedupe import IdempotencyStore
from actionmesh.sdk.inputs import InputModel, ProviderDefinitionError, input_model
from actionmesh.sdk.types import (
    ActionContext,
    ExecutionStatus,
    Facts,
    LongRunning,
    Preview,
    PreviewContext,
    RecordView,
    Result,
    Risk,
    Unavailable,
)
from actionmesh.v1 import common_pb2

if TYPE_CHECKING:
    from actionmesh.sdk.config import ProviderConfig
    from actionmesh.sdk.registration import RegistryLink

MAX_TIMEOUT_S = 3600.0

Availability = bool | Unavailable
Predicate = Callable[[RecordView], Availability]
Handler = Callable[[ActionContext, Any], Awaitable[Result]]
PreviewFunction = Callable[[PreviewContext, Any], Awaitable[Preview]]
Resolver = Callable[[str, str], Awaitable[Facts | None]]
# (tenant, action_id, idempotency_key) or (..., stored): see Provider.execution_status.
StatusFunction = Callable[..., Awaitable[ExecutionStatus | None]]
StartHook = Callable[["ProviderConfig"], Awaitable[None]]
StopHook = Callable[[], Awaitable[None]]

F = TypeVar("F", bound=Callable[..., Awaitable[Result]])
S = TypeVar("S", bound=Callable[..., Awaitable[None]])
P = TypeVar("P", bound=Callable[..., Awaitable[Preview]])
SourceT = TypeVar("SourceT", bound=Resolver)
StatusT = TypeVar("StatusT", bound=StatusFunction)


@dataclass(frozen=True)
class ActionDefinition:
    """One declared action: its descriptor fields, inputs, predicate and handler."""

    action_id: str
    label: str
    description: str
    record_types: tuple[str, ...]
    inputs: InputModel
    handler: Handler
    available: Predicate | None
    risk: Risk
    reversible: bool
    requires_approval: bool
    timeout_s: float | None
    long_running: LongRunning | None = None
    # The ``@provider.preview`` function (None: the action has no preview).
    preview: PreviewFunction | None = None

    @property
    def cancellable(self) -> bool:
        return self.long_running is not None and self.long_running.cancellable

    def descriptor(self) -> common_pb2.ActionDescriptor:
        return common_pb2.ActionDescriptor(
            action_id=self.action_id,
            label=self.label,
            description=self.description,
            record_types=list(self.record_types),
            inputs=self.inputs.fields,
            reversible=self.reversible,
            requires_approval=self.requires_approval,
            risk=self.risk.value,
            timeout_ms=0 if self.timeout_s is None else math.ceil(self.timeout_s * 1000),
            long_running=None if self.long_running is None else self.long_running.to_proto(),
            previewable=self.preview is not None,
        )


def _positional_params(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return None
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_hook(fn: Any, what: str, arity: int) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise ProviderDefinitionError(f"{what} hook {fn!r} must be an async def")
    params = _positional_params(fn)
    if params is None or len(params) != arity:
        raise ProviderDefinitionError(
            f"{what} hook {fn.__qualname__} must take exactly {arity} positional argument(s)"
        )


class Provider:
    """A provider: an id, a version and the actions it declares.

    >>> workitems = Provider("workitems", version="1.0.0", dedupe=True)
    >>> @workitems.action("workitem.retry", record_types=["workitem"])
    ... async def retry(ctx: ActionContext, inputs: RetryInputs) -> Result: ...

    ``dedupe=True`` stores each (tenant, action, idempotency key) and its result
    in the provider's database, so a repeated key returns the stored result
    without running the handler again; pass an :class:`IdempotencyStore` to use
    your own store instead. GetExecutionStatus (what became of an execution, by its
    idempotency key) is answered from that store; a provider without one answers
    UNIMPLEMENTED unless it declares ``@provider.execution_status``. Lifecycle:
    ``@provider.on_start`` hooks get the :class:`ProviderConfig` and run before the
    server accepts calls (open your state there); ``@provider.on_stop`` hooks run at
    shutdown after in-flight executions finished, in reverse order of declaration.
    """

    def __init__(
        self,
        id: str,
        *,
        version: str = "0.0.0",
        dedupe: bool | IdempotencyStore = False,
    ) -> None:
        if not isinstance(id, str) or not PROVIDER_ID.valid(id):
            raise ProviderDefinitionError(f"provider id {id!r} must match {PROVIDER_ID.pattern}")
        if not isinstance(version, str) or not version.strip() or len(version) > 64:
            raise ProviderDefinitionError(
                f"provider {id}: version must be a short non-empty string"
            )
        if not isinstance(dedupe, bool) and not all(
            callable(getattr(dedupe, name, None)) for name in ("claim", "complete", "release")
        ):
            raise ProviderDefinitionError(
                f"provider {id}: dedupe must be True/False or an IdempotencyStore"
            )
        self.id = id
        self.version = version
        self.dedupe = dedupe
        self._actions: dict[str, ActionDefinition] = {}
        self._sources: dict[str, Resolver] = {}
        self._status: StatusFunction | None = None
        self._status_takes_stored = False
        self._on_start: list[StartHook] = []
        self._on_stop: list[StopHook] = []
        # Set while served: definitions are frozen and a second concurrent serve refused.
        self.running = False
        # The registry link while served with a registry (see start_provider).
        self.registration: RegistryLink | None = None

    def __repr__(self) -> str:
        return f"Provider({self.id!r}, version={self.version!r}, actions={list(self._actions)})"

    @property
    def actions(self) -> Mapping[str, ActionDefinition]:
        return dict(self._actions)

    @property
    def record_sources(self) -> Mapping[str, Resolver]:
        """The record types this provider is the system of record of, with their resolvers."""
        return dict(self._sources)

    @property
    def status_function(self) -> StatusFunction | None:
        """The ``@provider.execution_status`` function, if one was declared."""
        return self._status

    @property
    def status_takes_stored(self) -> bool:
        """Whether the status function takes a fourth argument, the stored status."""
        return self._status_takes_stored

    @property
    def start_hooks(self) -> tuple[StartHook, ...]:
        return tuple(self._on_start)

    @property
    def stop_hooks(self) -> tuple[StopHook, ...]:
        return tuple(self._on_stop)

    def _check_mutable(self) -> None:
        if self.running:
            raise ProviderDefinitionError(f"provider {self.id} is running; declare actions first")

    def action(
        self,
        action_id: str,
        *,
        record_types: Iterable[str],
        label: str | None = None,
        description: str | None = None,
        available: Predicate | None = None,
        risk: Risk = Risk.MEDIUM,
        reversible: bool = False,
        requires_approval: bool = False,
        timeout_s: float | None = None,
        long_running: LongRunning | None = None,
    ) -> Callable[[F], F]:
        """Declare an action; decorates ``async def handler(ctx, inputs) -> Result``.

        The inputs dataclass is taken from the annotation of the handler's second
        parameter. ``label`` defaults to the action id, ``description`` to the
        handler's docstring. ``available(record) -> True | False |
        Unavailable(reason)`` must be a pure, fast function of the record; it is
        evaluated on every Discover. ``timeout_s`` is the deadline the gateway
        enforces (None: the gateway default); for a long-running action, the deadline
        of Execute's answer (ACCEPTED).

        ``long_running=LongRunning(max_duration_s=..., poll_interval_s=...,
        cancellable=...)`` makes it long-running: Execute answers ACCEPTED at once and
        the handler runs on as a background task (see :class:`LongRunning`); the provider
        needs ``dedupe`` or an ``@provider.execution_status`` function to say later what
        became of it.
        """
        self._check_mutable()
        where = f"action {action_id!r}"
        if not isinstance(action_id, str) or not ACTION_ID.valid(action_id):
            raise ProviderDefinitionError(
                f"{where}: id must match {ACTION_ID.pattern} (e.g. 'workitem.retry')"
            )
        if action_id in self._actions:
            raise ProviderDefinitionError(f"{where}: declared twice in provider {self.id}")
        if isinstance(record_types, str):
            raise ProviderDefinitionError(f"{where}: record_types must be a list, not a string")
        types = tuple(record_types)
        if not types:
            raise ProviderDefinitionError(f"{where}: record_types must not be empty")
        for record_type in types:
            if not isinstance(record_type, str) or not RECORD_TYPE.valid(record_type):
                raise ProviderDefinitionError(
                    f"{where}: record type {record_type!r} must match {RECORD_TYPE.pattern}"
                )
        if len(set(types)) != len(types):
            raise ProviderDefinitionError(f"{where}: record_types has duplicates")
        if not isinstance(risk, Risk):
            raise ProviderDefinitionError(f"{where}: risk must be a Risk, got {risk!r}")
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s <= MAX_TIMEOUT_S
        ):
            raise ProviderDefinitionError(
                f"{where}: timeout_s must be a number in (0, {MAX_TIMEOUT_S:g}] or None"
            )
        if long_running is not None:
            if not isinstance(long_running, LongRunning):
                raise ProviderDefinitionError(
                    f"{where}: long_running must be a LongRunning, got {long_running!r}"
                )
            problems = long_running.problems()
            if problems:
                raise ProviderDefinitionError(
                    f"{where}: invalid long_running: " + "; ".join(problems)
                )
            if self.dedupe is False and self._status is None:
                raise ProviderDefinitionError(
                    f"{where}: a long-running action needs a record of its executions: "
                    "declare the provider with dedupe=True (or a store), or declare "
                    "@provider.execution_status before the action"
                )
        if available is not None:
            if not callable(available) or inspect.iscoroutinefunction(available):
                raise ProviderDefinitionError(
                    f"{where}: available must be a plain (not async) function of the record"
                )
            params = _positional_params(available)
            if params is None or len(params) < 1 or any(p.default is p.empty for p in params[1:]):
                raise ProviderDefinitionError(
                    f"{where}: available must take exactly one argument, the record"
                )

        def decorate(handler: F) -> F:
            # Returned untouched (and un-narrowed by the checks below): still callable directly.
            declared = handler
            self._check_mutable()
            if action_id in self._actions:
                raise ProviderDefinitionError(f"{where}: declared twice in provider {self.id}")
            if not inspect.iscoroutinefunction(handler):
                raise ProviderDefinitionError(
                    f"{where}: handler {getattr(handler, '__qualname__', handler)!r} must be an "
                    "async def taking (ctx, inputs)"
                )
            params = _positional_params(handler)
            if params is None or len(params) != 2:
                raise ProviderDefinitionError(
                    f"{where}: handler {handler.__qualname__} must take exactly (ctx, inputs)"
                )
            inputs_cls = params[1].annotation
            if isinstance(inputs_cls, str):
                # String annotations (from __future__ import annotations) need resolving.
                try:
                    inputs_cls = typing.get_type_hints(handler).get(params[1].name)
                except Exception as exc:
                    raise ProviderDefinitionError(
                        f"{where}: cannot resolve the annotations of {handler.__qualname__}: {exc}"
                    ) from exc
            if inputs_cls is None or inputs_cls is inspect.Parameter.empty:
                raise ProviderDefinitionError(
                    f"{where}: annotate the handler's inputs parameter with its frozen dataclass "
                    "(use NoInputs for an action without inputs)"
                )
            model = input_model(inputs_cls, owner=where)
            problems = schema_problems(model.fields)
            if problems:
                raise ProviderDefinitionError(
                    f"{where}: invalid input schema: " + "; ".join(problems)
                )
            doc = inspect.getdoc(handler) or ""
            self._actions[action_id] = ActionDefinition(
                action_id=action_id,
                label=label or action_id,
                description=description if description is not None else doc,
                record_types=types,
                inputs=model,
                handler=handler,
                available=available,
                risk=risk,
                reversible=bool(reversible),
                requires_approval=bool(requires_approval),
                timeout_s=None if timeout_s is None else float(timeout_s),
                long_running=long_running,
            )
            return declared

        return decorate

    def preview(self, action_id: str) -> Callable[[P], P]:
        """Declare the dry run of an action declared above; decorates
        ``async def preview(ctx: PreviewContext, inputs) -> Preview``.

        It computes, without side effects, what an Execute of the same request would
        change (see :class:`Preview`), from the provider's own state: it must not
        write anything, and must answer the same (digest included) while that state
        does not change. The inputs parameter takes the action's inputs dataclass.

        Execute of a request approved on a preview carries its digest: the SDK asks
        this function again, under the idempotency key's claim and before the handler,
        and refuses REJECTED ``STATE_CHANGED_SINCE_PREVIEW`` (nothing ran) when the
        digest differs; the handler also gets it as ``ctx.preview_digest``.

        >>> @records.preview("ticket.change_service_level")
        ... async def preview_level(ctx: PreviewContext, inputs: ServiceLevelInputs) -> Preview: ...
        """
        self._check_mutable()
        where = f"preview of {action_id!r}"
        if action_id not in self._actions:
            raise ProviderDefinitionError(
                f"{where}: no such action in provider {self.id}; declare the action first"
            )

        def decorate(function: P) -> P:
            declared = function  # returned untouched (un-narrowed by the checks below)
            self._check_mutable()
            action = self._actions[action_id]
            if action.preview is not None:
                raise ProviderDefinitionError(f"{where}: declared twice")
            name = getattr(function, "__qualname__", repr(function))
            if not inspect.iscoroutinefunction(function):
                raise ProviderDefinitionError(
                    f"{where}: {name} must be an async def taking (ctx, inputs)"
                )
            params = _positional_params(function)
            if params is None or len(params) != 2:
                raise ProviderDefinitionError(f"{where}: {name} must take exactly (ctx, inputs)")
            annotation = params[1].annotation
            if isinstance(annotation, str):
                try:
                    annotation = typing.get_type_hints(function).get(params[1].name)
                except Exception as exc:
                    raise ProviderDefinitionError(
                        f"{where}: cannot resolve the annotations of {name}: {exc}"
                    ) from exc
            if annotation not in (None, inspect.Parameter.empty, action.inputs.cls):
                raise ProviderDefinitionError(
                    f"{where}: {name} takes {getattr(annotation, '__name__', annotation)}, but "
                    f"the action's inputs are {action.inputs.cls.__name__}"
                )
            self._actions[action_id] = replace(action, preview=function)
            return declared

        return decorate

    def record_source(self, record_type: str) -> Callable[[SourceT], SourceT]:
        """Declare this provider the system of record of ``record_type``.

        Decorates ``async def resolve(tenant: str, record_id: str) -> Facts | None``:
        the record's facts as this provider's own state holds them, or None when the
        tenant has no such record (answered NOT_FOUND). It must have no side effects.
        The registry refuses a second provider declaring the same record type.

        >>> @workitems.record_source("workitem")
        ... async def workitem_facts(tenant: str, record_id: str) -> Facts | None: ...
        """
        self._check_mutable()
        if not isinstance(record_type, str) or not RECORD_TYPE.valid(record_type):
            raise ProviderDefinitionError(
                f"provider {self.id}: record type {record_type!r} must match {RECORD_TYPE.pattern}"
            )
        if record_type in self._sources:
            raise ProviderDefinitionError(
                f"provider {self.id}: record type {record_type!r} already has a record source"
            )

        def decorate(resolver: SourceT) -> SourceT:
            _check_hook(resolver, f"record source {record_type!r}", 2)
            self._sources[record_type] = resolver
            return resolver

        return decorate

    def execution_status(self, function: StatusT) -> StatusT:
        """Declare how this provider tells what became of an execution (GetExecutionStatus).

        Decorates ``async def status(tenant: str, action_id: str, idempotency_key: str)
        -> ExecutionStatus | None``, for a provider whose own or external system can say
        what happened under an idempotency key. It may take a fourth argument, ``stored:
        ExecutionStatus``: what the SDK's idempotency store holds for the key
        (``dedupe=True``; always NEVER_RECEIVED without dedupe), to keep or improve on.
        None means "nothing to add": the stored status is the answer. It must have no
        side effects, answer another tenant's key as never received, and never change a
        FINISHED answer. Raise ``actionmesh.rpc.errors.Unavailable`` when the system it
        asks does not answer (the caller asks again later).

        Without it a ``dedupe`` provider answers from its store alone, and a provider
        without dedupe answers UNIMPLEMENTED.

        >>> @tickets.execution_status
        ... async def status(tenant: str, action_id: str, key: str) -> ExecutionStatus | None: ...
        """
        declared = function  # returned untouched (un-narrowed by the checks below)
        self._check_mutable()
        where = f"provider {self.id}: execution_status"
        if self._status is not None:
            raise ProviderDefinitionError(f"{where} is declared twice")
        name = getattr(function, "__qualname__", repr(function))
        if not inspect.iscoroutinefunction(function):
            raise ProviderDefinitionError(
                f"{where} {name} must be an async def (tenant, action_id, idempotency_key)"
            )
        params = _positional_params(function)
        if (
            params is None
            or not 3 <= len(params) <= 4
            or any(p.default is not p.empty for p in params)
        ):
            raise ProviderDefinitionError(
                f"{where} {name} must take (tenant, action_id, idempotency_key), optionally "
                "followed by stored (what the SDK's idempotency store holds)"
            )
        self._status = function
        self._status_takes_stored = len(params) == 4
        return declared

    def on_start(self, hook: S) -> S:
        """Run ``async def hook(config: ProviderConfig)`` before serving (open state here)."""
        self._check_mutable()
        _check_hook(hook, "on_start", 1)
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: S) -> S:
        """Run ``async def hook()`` at shutdown, after in-flight executions finished."""
        self._check_mutable()
        _check_hook(hook, "on_stop", 0)
        self._on_stop.append(hook)
        return hook

    def check(self) -> None:
        """Refuse to serve a provider that declares neither actions nor record sources (a
        pure system of record, with no actions of its own, is a provider too)."""
        if not self._actions and not self._sources:
            raise ProviderDefinitionError(
                f"provider {self.id} declares no actions and is the source of no record type"
            )
