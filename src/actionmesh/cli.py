"""The ``actionmesh`` command: run the mesh locally and drive it like a backend would.

    actionmesh up                      # registry, auditlog, gateway, providers on loopback
    actionmesh up --tls                # the same over mutual TLS with a development CA
    export ACTIONMESH_TOKEN=$(actionmesh token --subject alice --tenant acme --roles operator)
    actionmesh actions workitem/wi-1001 --status failed
    actionmesh run workitem.retry workitem/wi-1001 --status failed --input reason="parser fixed"
    actionmesh history workitem/wi-1001
    actionmesh executions --actor alice --since 2h    # who ran what, and how it ended
    actionmesh trace TRACE_ID                  # the audit events of one trace
    actionmesh audit verify                    # recompute the tamper-evident hash chains
    actionmesh approvals                       # what waits for a second person
    actionmesh approve EXECUTION_ID ticket/t-100 --status open --comment "checked"
    actionmesh reject EXECUTION_ID --comment "wrong customer"
    actionmesh policy                          # which policy file is in force

Every command but ``up`` and ``token`` takes ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import jwt
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from actionmesh.bench import add_bench_command
from actionmesh.client import ActionMeshError, GatewayClient, from_rpc_error
from actionmesh.db_cli import add_db_commands
from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import STATE_FILE, Mesh, MeshError, MeshSettings
from actionmesh.provider_cli import add_provider_commands
from actionmesh.registry_cli import add_registry_commands
from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.tls import TlsConfig, TlsConfigError
from actionmesh.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    gateway_pb2,
    registry_pb2,
    registry_pb2_grpc,
)

DEFAULT_DATA_DIR = Path(os.environ.get("ACTIONMESH_DATA_DIR", ".actionmesh"))
console = Console()
T = TypeVar("T")


class CliError(Exception):
    """A user-facing failure: printed without a traceback, exit code 1."""


# -- helpers -------------------------------------------------------------------
def mesh_state(data_dir: Path) -> dict[str, Any]:
    path = data_dir / STATE_FILE
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()))


def gateway_address(args: argparse.Namespace) -> str:
    explicit = args.gateway or os.environ.get("ACTIONMESH_GATEWAY")
    return explicit or mesh_state(args.data_dir).get("gateway", "127.0.0.1:50050")


def client_tls(args: argparse.Namespace) -> TlsConfig | None:
    """TLS files from --tls-* flags, else ACTIONMESH_TLS_* variables, else the running mesh."""
    given = TlsConfig(
        cert_file=args.tls_cert or os.environ.get("ACTIONMESH_TLS_CERT", ""),
        key_file=args.tls_key or os.environ.get("ACTIONMESH_TLS_KEY", ""),
        ca_file=args.tls_ca or os.environ.get("ACTIONMESH_TLS_CA", ""),
    )
    if not given.enabled:
        # `actionmesh up --tls` records its client certificate next to the addresses.
        files = mesh_state(args.data_dir).get("tls") or {}
        given = TlsConfig(
            cert_file=files.get("cert_file", ""),
            key_file=files.get("key_file", ""),
            ca_file=files.get("ca_file", ""),
        )
    if not given.enabled:
        return None
    try:
        given.check(server=False)
    except TlsConfigError as exc:
        # The flags of a client are spelt --tls-ca/--tls-cert/--tls-key, not tls_*_file.
        message = str(exc)
        for field, flag in (
            ("tls_ca_file", "--tls-ca"),
            ("tls_cert_file", "--tls-cert"),
            ("tls_key_file", "--tls-key"),
        ):
            message = message.replace(field, flag)
        raise CliError(message) from None
    return given


def add_tls_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tls-ca",
        default="",
        help="CA certificate (PEM) the server's certificate must chain to; turns TLS on "
        "(default: $ACTIONMESH_TLS_CA, else the running mesh's)",
    )
    command.add_argument(
        "--tls-cert",
        default="",
        help="client certificate (PEM) for servers that require one ($ACTIONMESH_TLS_CERT)",
    )
    command.add_argument(
        "--tls-key", default="", help="key (PEM) of --tls-cert ($ACTIONMESH_TLS_KEY)"
    )


def caller_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("ACTIONMESH_TOKEN")
    if not token:
        raise CliError(
            "no token: pass --token or export ACTIONMESH_TOKEN=$(actionmesh token "
            "--subject alice --tenant acme --roles operator)"
        )
    return str(token)


def unverified_claims(token: str) -> dict[str, Any]:
    """Read the tenant from the caller's own token (the gateway verifies it)."""
    try:
        return dict(jwt.decode(token, options={"verify_signature": False}))
    except jwt.PyJWTError as exc:
        raise CliError(f"the token is not a JWT: {exc}") from exc


def parse_record_ref(text: str) -> common_pb2.RecordRef:
    record_type, sep, record_id = text.partition("/")
    if not sep or not record_type or not record_id:
        raise CliError(f"record must be TYPE/ID, e.g. workitem/wi-1001 (got {text!r})")
    return common_pb2.RecordRef(type=record_type, id=record_id)


def record_context(args: argparse.Namespace, token: str) -> common_pb2.RecordContext:
    ref = parse_record_ref(args.record)
    tenant = args.tenant or unverified_claims(token).get("tenant", "")
    attributes = {}
    for item in args.attr or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--attr takes KEY=VALUE (got {item!r})")
        attributes[key] = value
    return common_pb2.RecordContext(
        tenant=tenant,
        type=ref.type,
        id=ref.id,
        status=args.status,
        sensitivity=common_pb2.Sensitivity.Value(f"SENSITIVITY_{args.sensitivity.upper()}"),
        attributes=attributes,
        version=args.version,
    )


def typed_input(raw: str, field: common_pb2.InputField | None) -> common_pb2.InputValue:
    """Convert a --input value with the action's declared type (guessing when unknown)."""
    kind = field.type if field is not None else None
    if kind in (common_pb2.INPUT_TYPE_STRING, common_pb2.INPUT_TYPE_ENUM):
        return common_pb2.InputValue(string_value=raw)
    if kind == common_pb2.INPUT_TYPE_BOOLEAN or (kind is None and raw in ("true", "false")):
        return common_pb2.InputValue(bool_value=raw.lower() in ("true", "1", "yes"))
    try:
        if kind in (common_pb2.INPUT_TYPE_INTEGER, None):
            return common_pb2.InputValue(integer_value=int(raw))
    except ValueError:
        if kind is not None:
            return common_pb2.InputValue(string_value=raw)  # the gateway explains the type error
    try:
        return common_pb2.InputValue(number_value=float(raw))
    except ValueError:
        return common_pb2.InputValue(string_value=raw)


def to_dict(message: Any) -> dict[str, Any]:
    """A message as JSON-ready data, every scalar field present (``available: false``
    too), so scripts need no knowledge of proto3 defaults."""
    return dict(
        MessageToDict(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    )


def enum_label(prefix: str, name: str) -> str:
    return name.removeprefix(prefix)


def on_gateway(args: argparse.Namespace, call: Callable[[GatewayClient], Awaitable[T]]) -> T:
    """Run one call through the typed client (deadline, token, retries where safe)."""
    token = caller_token(args)

    async def run() -> T:
        async with GatewayClient(
            gateway_address(args), token=token, tls=client_tls(args), timeout_s=args.timeout
        ) as gateway:
            return await call(gateway)

    return asyncio.run(run())


# -- commands ------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    settings = MeshSettings(
        data_dir=args.data_dir,
        registry_port=args.registry_port,
        auditlog_port=args.auditlog_port,
        gateway_port=args.gateway_port,
        supportdesk_port=args.supportdesk_port,
        webhook_receiver_port=args.webhook_receiver_port,
        seed_demo=not args.no_seed,
        tls=args.tls,
        # Prometheus /metrics on a free port per service unless the environment says otherwise.
        extra_env={
            name: "0"
            for name in (
                "ACTIONMESH_GATEWAY_METRICS_PORT",
                "ACTIONMESH_AUDITLOG_METRICS_PORT",
                "ACTIONMESH_REGISTRY_METRICS_PORT",
            )
            if name not in os.environ
        },
    )
    mesh = Mesh(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"starting the mesh under {mesh.data_dir} ...")
    try:
        mesh.start()
    except MeshError as exc:
        raise CliError(str(exc)) from exc
    table = Table(title="actionmesh is up")
    table.add_column("service")
    table.add_column("address")
    table.add_column("metrics")
    table.add_column("log")
    for service in mesh.services.values():
        table.add_row(
            service.name,
            service.url or service.address,
            service.metrics_url,
            str(service.log_path),
        )
    console.print(table)
    exe = "actionmesh"
    # Plain print: these lines are meant to be copied, so they must not be re-wrapped.
    print(
        "\nIn another terminal:\n"
        f"  export ACTIONMESH_TOKEN=$({exe} token --subject alice --tenant acme --roles operator)\n"
        f"  {exe} actions workitem/wi-1001 --status failed\n"
        f"  {exe} run workitem.retry workitem/wi-1001 --status failed "
        '--input reason="mail parser fixed"\n'
        f"  {exe} history workitem/wi-1001\n"
        f"  {exe} notifications --token $({exe} token --subject sam --tenant acme "
        "--roles supervisor)\n"
        f"\nPolicies: {mesh.policy_path}   Press Ctrl-C to stop.",
        flush=True,
    )
    receiver = mesh.services.get("webhook-receiver")
    if receiver is not None:
        print(
            f"Notifications: tenant acme's events go to the local receiver {receiver.url} "
            f"(subscriptions: {mesh.notifications_path}); it logs each verified one to "
            f"{receiver.log_path} and {mesh.receiver_events_path}.",
            flush=True,
        )
    client = mesh.client_tls
    if client is not None:
        print(
            f"\nMutual TLS is on. Development CA: {client.ca_file}\n"
            f"The CLI uses {mesh.data_dir / STATE_FILE} to connect; elsewhere a client "
            "verifies servers with the CA and presents a certificate it signed:\n"
            f"  export ACTIONMESH_TLS_CA={client.ca_file}\n"
            f"  export ACTIONMESH_TLS_CERT={client.cert_file}\n"
            f"  export ACTIONMESH_TLS_KEY={client.key_file}\n"
            f"  grpcurl -cacert {client.ca_file} -cert {client.cert_file} "
            f"-key {client.key_file} {mesh.address('gateway')} list",
            flush=True,
        )
    try:
        while not stop.wait(0.5):
            dead = mesh.dead_services()
            if dead:
                console.print(f"[red]service(s) exited: {', '.join(dead)}; stopping[/red]")
                return 1
    finally:
        console.print("stopping the mesh ...")
        mesh.stop()
        console.print("stopped.")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    key_file = args.key_file or mesh_state(args.data_dir).get("signing_key_file")
    key_path = Path(key_file) if key_file else args.data_dir / "dev-signing-key"
    if not key_path.exists():
        raise CliError(f"no development signing key at {key_path}; run `actionmesh up` first")
    roles = [r for r in args.roles.split(",") if r]
    token = mint_token(
        key_path.read_text().strip(),
        subject=args.subject,
        tenant=args.tenant,
        roles=roles,
        ttl_s=args.ttl,
    )
    print(json.dumps({"token": token}) if args.json else token)
    return 0


def cmd_actions(args: argparse.Namespace) -> int:
    record = record_context(args, caller_token(args))
    reply = on_gateway(args, lambda gateway: gateway.discover(record))
    if args.json:
        print(json.dumps(to_dict(reply), indent=2))
        return 0
    facts = reply.facts
    title = f"actions for {args.record} ({describe_facts(facts) or 'no facts'})"
    table = Table(title=title, caption=f"facts: {vouched(facts)}" if facts.ByteSize() else None)
    for column in ("action", "label", "provider", "available", "inputs", "risk"):
        table.add_column(column)
    for view in reply.actions:
        descriptor = view.descriptor
        inputs = ", ".join(
            f"{f.name}{'' if f.required else '?'}:"
            f"{enum_label('INPUT_TYPE_', common_pb2.InputType.Name(f.type)).lower()}"
            for f in descriptor.inputs
        )
        table.add_row(
            descriptor.action_id,
            descriptor.label,
            view.provider_id,
            "yes" if view.available else f"no ({view.unavailable_reason})",
            inputs,
            enum_label("RISK_", common_pb2.Risk.Name(descriptor.risk)).lower(),
        )
    console.print(table)
    if facts.caller_version:
        console.print(
            f"[yellow]you looked at version {facts.caller_version}; the record is now at "
            f"{facts.version}: the actions above are for the record as it is now[/yellow]"
        )
    for degraded in reply.degraded_providers:
        console.print(f"[yellow]degraded: {degraded.provider_id} ({degraded.reason})[/yellow]")
    if not reply.actions:
        console.print("no actions visible for this record")
    return 0


def action_inputs(
    args: argparse.Namespace, record: common_pb2.RecordContext
) -> dict[str, common_pb2.InputValue]:
    """``--input NAME=VALUE`` values, typed by the action's schema (from discovery)."""
    schema: dict[str, common_pb2.InputField] = {}
    discovered = on_gateway(args, lambda gateway: gateway.discover(record))
    for view in discovered.actions:
        if view.descriptor.action_id == args.action:
            schema = {f.name: f for f in view.descriptor.inputs}
    inputs = {}
    for item in args.input or []:
        name, sep, raw = item.partition("=")
        if not sep:
            raise CliError(f"--input takes NAME=VALUE (got {item!r})")
        inputs[name] = typed_input(raw, schema.get(name))
    return inputs


def cmd_preview(args: argparse.Namespace) -> int:
    record = record_context(args, caller_token(args))
    inputs = action_inputs(args, record)
    reply = on_gateway(args, lambda gateway: gateway.preview(args.action, record, inputs))
    if args.json:
        print(json.dumps(to_dict(reply), indent=2))
        return 0
    console.print(f"[bold]{args.action}[/bold] on {args.record}: a preview, nothing ran")
    for line in preview_lines(reply.preview):
        console.print(line)
    if reply.facts.ByteSize():
        console.print(f"facts: {vouched(reply.facts)}")
    return 0


def preview_lines(preview: common_pb2.ActionPreview) -> list[str]:
    """A preview in words: changes, effect, warnings, the state it was computed on."""
    lines = [
        f"  would change {c.field}: {c.before or '(none)'} -> {c.after or '(none)'}"
        for c in preview.changes
    ]
    if preview.effect:
        lines.append(f"  effect: {preview.effect}")
    lines.extend(f"  [yellow]warning: {w}[/yellow]" for w in preview.warnings)
    previewed = preview.previewed_at.ToDatetime().isoformat(" ", "seconds")
    lines.append(
        f"  previewed by {preview.provider_id} at {previewed} on state {preview.state_digest} "
        "(if the record moves before it runs, the provider refuses it)"
    )
    return lines


def preview_summary(preview: common_pb2.ActionPreview) -> str:
    """One cell: "service_level: standard -> critical; escalates ..." ("" when none)."""
    if not preview.state_digest:
        return ""
    parts = [f"{c.field}: {c.before or '(none)'} -> {c.after or '(none)'}" for c in preview.changes]
    if preview.effect:
        parts.append(preview.effect)
    parts.extend(f"warning: {w}" for w in preview.warnings)
    return "; ".join(parts) or "no change"


def cmd_run(args: argparse.Namespace) -> int:
    token = caller_token(args)
    record = record_context(args, token)
    inputs = action_inputs(args, record)
    key = args.idempotency_key or uuid.uuid4().hex
    execution = on_gateway(
        args,
        lambda gateway: gateway.execute(args.action, record, inputs, idempotency_key=key),
    )
    return show_execution(args, execution)


def vouched(facts: common_pb2.RecordFacts, *, short: bool = False) -> str:
    """Who vouched for the record facts a decision was taken on ('' when none recorded)."""
    if not facts.ByteSize():
        return ""
    if facts.source == common_pb2.FACT_SOURCE_PROVIDER:
        if short:
            return f"{facts.vouched_by}@{facts.version}"
        stale = f"; the caller had seen {facts.caller_version}" if facts.caller_version else ""
        return f"system of record {facts.vouched_by}, version {facts.version}{stale}"
    if facts.source == common_pb2.FACT_SOURCE_TRUSTED_CALLER:
        return facts.vouched_by if short else f"trusted caller {facts.vouched_by}"
    return "unverified" if short else "unverified (the caller's claim)"


def describe_facts(facts: common_pb2.RecordFacts) -> str:
    """The facts themselves, in one line: status, sensitivity, attributes."""
    if not facts.ByteSize():
        return ""
    sensitivity = enum_label("SENSITIVITY_", common_pb2.Sensitivity.Name(facts.sensitivity))
    parts = [f"status {facts.status or '-'}", f"sensitivity {sensitivity.lower()}"]
    parts += [f"{k}={v}" for k, v in sorted(facts.attributes.items())]
    return ", ".join(parts)


def show_execution(args: argparse.Namespace, execution: gateway_pb2.Execution) -> int:
    """Print an execution; exit 0 only for SUCCEEDED (3 otherwise, e.g. PENDING_APPROVAL)."""
    if args.json:
        print(json.dumps(to_dict(execution), indent=2))
        return 0 if execution.outcome == common_pb2.OUTCOME_SUCCEEDED else 3
    outcome = enum_label("OUTCOME_", common_pb2.Outcome.Name(execution.outcome))
    console.print(f"[bold]{outcome}[/bold]  execution {execution.execution_id}")
    approval = execution.approval
    lines = [
        ("action", f"{execution.action_id} on {execution.record.type}/{execution.record.id}"),
        ("requested by", execution.actor),
        ("reason", execution.reason),
        ("message", execution.message),
        ("external ref", execution.external_ref),
        ("trace id", execution.trace_id),
        ("facts", describe_facts(execution.facts)),
        ("vouched by", vouched(execution.facts)),
    ]
    if approval.state:
        state = enum_label("APPROVAL_STATE_", gateway_pb2.ApprovalState.Name(approval.state))
        by = f" by {approval.approver}" if approval.approver else ""
        note = f" ({approval.comment})" if approval.comment else ""
        lines.append(("approval", f"{state.lower()}{by}{note}"))
        if approval.required_approvals > 1 or approval.required_roles or approval.votes:
            lines.append(("approvals", quorum_so_far(approval)))
        if approval.state == gateway_pb2.APPROVAL_STATE_PENDING:
            lines.append(("expires", approval.expires_at.ToDatetime().isoformat(" ", "seconds")))
        if approval.state == gateway_pb2.APPROVAL_STATE_PENDING and approval.still_needed:
            lines.append(("still needed", approval.still_needed))
    lines.append(("preview", preview_summary(execution.preview)))
    if execution.outcome == common_pb2.OUTCOME_ACCEPTED or execution.accepted_at.seconds:
        lines.extend(running_lines(execution))
    if execution.outcome != common_pb2.OUTCOME_ACCEPTED:
        lines.extend(reconcile_lines(execution))
    for label, value in lines:
        if value:
            console.print(f"  {label}: {value}")
    for change in execution.changes:
        console.print(f"  changed {change.field}: {change.before} -> {change.after}")
    for warning in execution.warnings:
        console.print(f"  [yellow]warning: {warning}[/yellow]")
    return 0 if execution.outcome == common_pb2.OUTCOME_SUCCEEDED else 3


def running_lines(execution: gateway_pb2.Execution) -> list[tuple[str, str]]:
    """A long-running execution: when accepted, how far it got, its deadline, any cancel."""

    def at(stamp: Any) -> str:
        return str(stamp.ToDatetime().isoformat(" ", "seconds")) if stamp.seconds else ""

    lines = [("accepted", at(execution.accepted_at))]
    if execution.outcome == common_pb2.OUTCOME_ACCEPTED:
        progress = execution.progress
        percent = f"{progress.percent}% " if progress.HasField("percent") else ""
        if percent or progress.message:
            since = f" (as of {at(progress.updated_at)})" if progress.updated_at.seconds else ""
            lines.append(("progress", f"{percent}{progress.message}{since}"))
        lines.append(("must finish by", at(execution.run_deadline)))
    if execution.cancel_requested_by:
        note = f": {execution.cancel_comment}" if execution.cancel_comment else ""
        lines.append(
            (
                "cancel",
                f"asked by {execution.cancel_requested_by} at "
                f"{at(execution.cancel_requested_at)}{note}",
            )
        )
    return lines


def reconcile_lines(execution: gateway_pb2.Execution) -> list[tuple[str, str]]:
    """What the caller was told against what became of it (unsettled outcomes)."""
    told = enum_label("OUTCOME_", common_pb2.Outcome.Name(execution.outcome))
    state = execution.reconcile_state
    lines: list[tuple[str, str]] = []
    if execution.late_outcome:
        resolved = enum_label("OUTCOME_", common_pb2.Outcome.Name(execution.late_outcome))
        why = f" ({execution.resolved_reason})" if execution.resolved_reason else ""
        ran = " - nothing ran" if execution.late_outcome == common_pb2.OUTCOME_UNAVAILABLE else ""
        lines.append(("told", told))
        lines.append(("resolved", f"{resolved}{why}{ran}, learned after the caller was told"))
        if execution.late_result_at.seconds:
            lines.append(("resolved at", execution.late_result_at.ToDatetime().isoformat(" ")))
    elif state == gateway_pb2.RECONCILE_STATE_PENDING:
        lines.append(("told", told))
        when = execution.reconcile_next_at.ToDatetime().isoformat(" ", "seconds")
        lines.append(
            (
                "resolved",
                f"not yet: the gateway asks the provider ({execution.reconcile_attempts} "
                f"attempts so far, next at {when})",
            )
        )
    elif state == gateway_pb2.RECONCILE_STATE_NEEDS_ATTENTION:
        lines.append(("told", told))
        lines.append(
            (
                "resolved",
                f"[red]NEEDS ATTENTION[/red] ({execution.resolved_reason}): the gateway cannot "
                "find out whether the provider acted; check the provider's system",
            )
        )
    return lines


def cmd_execution(args: argparse.Namespace) -> int:
    execution = on_gateway(args, lambda gateway: gateway.get_execution(args.execution_id))
    show_execution(args, execution)
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    record = parse_record_ref(args.record) if args.record else None
    reply = on_gateway(
        args, lambda gateway: gateway.pending_approvals(record, page_size=args.limit)
    )
    if args.json:
        print(json.dumps([to_dict(a) for a in reply.approvals], indent=2))
        return 0
    table = Table(title="waiting for your approval")
    for column in (
        "execution",
        "requested by",
        "action",
        "record",
        "inputs",
        "preview (what approving changes)",
        "approvals so far",
        "expires",
    ):
        # The id is what `approve` takes: never wrapped.
        table.add_column(column, no_wrap=column == "execution")
    for pending in reply.approvals:
        execution = pending.execution
        table.add_row(
            execution.execution_id,
            f"{execution.actor} ({', '.join(pending.requester_roles)})",
            execution.action_id,
            f"{execution.record.type}/{execution.record.id} [{pending.record.status}]",
            ", ".join(f"{k}={display_value(v)}" for k, v in sorted(pending.inputs.items())),
            preview_summary(execution.preview) or "(no preview)",
            quorum_so_far(execution.approval),
            execution.approval.expires_at.ToDatetime().isoformat(" ", "seconds"),
        )
    console.print(table)
    if not reply.approvals:
        console.print("nothing waits for your approval")
    return 0


def quorum_so_far(approval: gateway_pb2.Approval) -> str:
    """ "1 of 2 (bob); needs: an approver with role supervisor" """
    needed = approval.required_approvals or 1
    who = ", ".join(v.approver for v in approval.votes)
    roles = f", incl. {' and '.join(approval.required_roles)}" if approval.required_roles else ""
    text = f"{len(approval.votes)} of {needed}{roles}" + (f" ({who})" if who else "")
    return f"{text}; needs {approval.still_needed}" if approval.still_needed else text


def display_value(value: common_pb2.InputValue) -> str:
    kind = value.WhichOneof("kind")
    return "" if kind is None else str(getattr(value, kind))


def cmd_approve(args: argparse.Namespace) -> int:
    token = caller_token(args)
    request = gateway_pb2.ApproveExecutionRequest(
        execution_id=args.execution_id,
        comment=args.comment or "",
        record=record_context(args, token) if args.record else None,
    )
    reply = on_gateway(args, lambda gateway: gateway.approve(request))
    return show_execution(args, reply.execution)


def cmd_reject(args: argparse.Namespace) -> int:
    request = gateway_pb2.RejectExecutionRequest(
        execution_id=args.execution_id, comment=args.comment
    )
    reply = on_gateway(args, lambda gateway: gateway.reject(request))
    show_execution(args, reply.execution)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    request = gateway_pb2.CancelExecutionRequest(
        execution_id=args.execution_id, comment=args.comment
    )
    reply = on_gateway(args, lambda gateway: gateway.cancel(request))
    show_execution(args, reply.execution)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    try:
        outcome = common_pb2.Outcome.Value(f"OUTCOME_{args.outcome.upper()}")
    except ValueError as exc:
        raise CliError(f"unknown outcome {args.outcome!r}") from exc
    request = gateway_pb2.ResolveExecutionRequest(
        execution_id=args.execution_id,
        outcome=outcome,
        comment=args.comment,
        external_ref=args.ref or "",
    )
    reply = on_gateway(args, lambda gateway: gateway.resolve(request))
    show_execution(args, reply.execution)
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    reply = on_gateway(args, lambda gateway: gateway.policy_status())
    if args.json:
        print(json.dumps(to_dict(reply), indent=2))
        return 0 if not reply.reload_error else 4
    console.print(f"policy file: {reply.policy_file}")
    console.print(f"  in force since {reply.loaded_at.ToDatetime().isoformat(' ', 'seconds')} UTC")
    console.print(f"  sha256 {reply.digest}")
    console.print(f"  policies: {', '.join(reply.policy_ids)}")
    if reply.reload_error:
        console.print(
            "[red]the file on disk was refused; the policies above stay in force:[/red]\n"
            f"  {reply.reload_error}"
        )
        return 4
    return 0


# Events whose message says more than their reason (an approver's comment, a count).
TYPES_WITH_MESSAGE = (
    audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_GRANTED,
    audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REJECTED,
    audit_pb2.AUDIT_EVENT_TYPE_ACTIONS_DISCOVERED,
)


def event_table(title: str, events: Sequence[audit_pb2.AuditEvent]) -> Table:
    """Audit events as a readable table: when, who, what, outcome, external ref, changes."""
    table = Table(title=title)
    for column in (
        "when",
        "who",
        "action",
        "event",
        "outcome",
        "reason",
        "external ref",
        "changes",
        "facts from",
    ):
        table.add_column(column)
    for event in events:
        table.add_row(
            event.occurred_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            event.actor,
            event.action_id,
            enum_label("AUDIT_EVENT_TYPE_", audit_pb2.AuditEventType.Name(event.type))
            .lower()
            .replace("_", " "),
            enum_label("OUTCOME_", common_pb2.Outcome.Name(event.outcome)) if event.outcome else "",
            event.reason if event.type not in TYPES_WITH_MESSAGE else event.message,
            event.external_ref,
            "; ".join(f"{c.field}: {c.before} -> {c.after}" for c in event.changes),
            vouched(event.facts, short=True),
        )
    return table


def cmd_history(args: argparse.Namespace) -> int:
    record = parse_record_ref(args.record)
    reply = on_gateway(
        args,
        lambda gateway: gateway.record_history(
            record, page_size=args.limit, include_discovery=args.include_discovery
        ),
    )
    if args.json:
        print(json.dumps([to_dict(e) for e in reply.events], indent=2))
        return 0
    console.print(event_table(f"history of {args.record}", reply.events))
    if not reply.events:
        console.print("no events yet for this record")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    reply = on_gateway(args, lambda gateway: gateway.get_trace(args.trace_id, page_size=args.limit))
    if args.json:
        print(json.dumps([to_dict(e) for e in reply.events], indent=2))
        return 0
    console.print(event_table(f"audit events of trace {args.trace_id}", reply.events))
    return 0


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_instant(text: str) -> datetime:
    """An ISO 8601 instant (UTC when no offset is given), or a duration ago: 30m, 2h, 7d."""
    duration = _DURATION.fullmatch(text)
    if duration:
        amount, unit = duration.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"{text!r} is neither an ISO 8601 time nor a duration like 2h") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_executions(args: argparse.Namespace) -> int:
    outcomes = []
    for name in args.outcome or []:
        try:
            outcomes.append(common_pb2.Outcome.Value(f"OUTCOME_{name.upper()}"))
        except ValueError as exc:
            raise CliError(f"unknown outcome {name!r}") from exc
    request = gateway_pb2.ListExecutionsRequest(
        actor=args.actor or "",
        action_id=args.action or "",
        outcomes=outcomes,
        page_size=args.limit,
        page_token=args.page_token or "",
        unresolved=args.unresolved,
    )
    if args.record:
        request.record.CopyFrom(parse_record_ref(args.record))
    if args.since:
        request.started_after.FromDatetime(parse_instant(args.since))
    if args.until:
        request.started_before.FromDatetime(parse_instant(args.until))
    reply = on_gateway(args, lambda gateway: gateway.list_executions(request))
    if args.unresolved:
        return show_unresolved(args, reply.unresolved)
    if args.json:
        print(
            json.dumps(
                {
                    "executions": [to_dict(e) for e in reply.executions],
                    "next_page_token": reply.next_page_token,
                },
                indent=2,
            )
        )
        return 0
    table = Table(title="executions, newest first")
    for column in (
        "started",
        "execution",
        "who",
        "approver",
        "action",
        "record",
        "outcome",
        "reason",
        "external ref",
    ):
        table.add_column(column)
    for summary in reply.executions:
        outcome = common_pb2.Outcome.Name(summary.outcome)
        table.add_row(
            summary.started_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            summary.execution_id,
            summary.actor,
            summary.approver,
            summary.action_id,
            f"{summary.record.type}/{summary.record.id}",
            enum_label("OUTCOME_", outcome) if summary.outcome else "RUNNING",
            summary.reason,
            summary.external_ref,
        )
    console.print(table)
    if reply.next_page_token:
        console.print(f"more: --page-token {reply.next_page_token}")
    return 0


def show_unresolved(args: argparse.Namespace, executions: Sequence[gateway_pb2.Execution]) -> int:
    """Executions whose outcome still needs an answer; exit 3 when one needs a person."""
    attention = any(
        e.reconcile_state == gateway_pb2.RECONCILE_STATE_NEEDS_ATTENTION for e in executions
    )
    if args.json:
        print(json.dumps([to_dict(e) for e in executions], indent=2))
        return 3 if attention else 0
    table = Table(title="executions whose outcome still needs an answer, oldest first")
    for column in ("started", "execution", "who", "action", "record", "told", "state", "why"):
        table.add_column(column)
    for execution in executions:
        state = enum_label(
            "RECONCILE_STATE_", gateway_pb2.ReconcileState.Name(execution.reconcile_state)
        )
        if execution.reconcile_state == gateway_pb2.RECONCILE_STATE_PENDING:
            state = f"{state} ({execution.reconcile_attempts} attempts)"
        table.add_row(
            execution.started_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            execution.execution_id,
            execution.actor,
            execution.action_id,
            f"{execution.record.type}/{execution.record.id}",
            enum_label("OUTCOME_", common_pb2.Outcome.Name(execution.outcome)),
            state,
            execution.resolved_reason or execution.reason,
        )
    console.print(table)
    if not executions:
        console.print("every execution's outcome is known")
    return 3 if attention else 0


def cmd_notifications(args: argparse.Namespace) -> int:
    """The tenant's webhook delivery log; exit 3 when a listed delivery FAILED."""
    reply = on_gateway(
        args,
        lambda gateway: gateway.notification_deliveries(
            failed_only=args.failed,
            subscription_id=args.subscription or "",
            page_size=args.limit,
            page_token=args.page_token or "",
        ),
    )
    failed = any(
        d.state == gateway_pb2.NOTIFICATION_DELIVERY_STATE_FAILED for d in reply.deliveries
    )
    if args.json:
        print(
            json.dumps(
                {
                    "deliveries": [to_dict(d) for d in reply.deliveries],
                    "next_page_token": reply.next_page_token,
                },
                indent=2,
            )
        )
        return 3 if failed else 0
    table = Table(title="webhook notifications, newest first")
    for column in ("created", "subscription", "event", "execution", "state", "tries", "last"):
        table.add_column(column)
    for delivery in reply.deliveries:
        state = enum_label(
            "NOTIFICATION_DELIVERY_STATE_",
            gateway_pb2.NotificationDeliveryState.Name(delivery.state),
        )
        if delivery.state == gateway_pb2.NOTIFICATION_DELIVERY_STATE_PENDING and delivery.attempts:
            state += " (retry " + delivery.next_attempt_at.ToDatetime().strftime("%H:%M:%S") + ")"
        last = delivery.last_error or (
            f"HTTP {delivery.last_status_code}" if delivery.last_status_code else ""
        )
        table.add_row(
            delivery.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            delivery.subscription_id,
            delivery.event_type,
            delivery.execution_id,
            state,
            str(delivery.attempts),
            last,
        )
    console.print(table)
    if not reply.deliveries:
        console.print("no notifications" + (" failed" if args.failed else ""))
    if reply.next_page_token:
        console.print(f"more: --page-token {reply.next_page_token}")
    return 3 if failed else 0


def auditlog_address(args: argparse.Namespace) -> str:
    explicit = args.auditlog or os.environ.get("ACTIONMESH_AUDITLOG")
    return explicit or mesh_state(args.data_dir).get("auditlog", "127.0.0.1:50052")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the hash chains; exit 5 when a link is broken (scripts and cron can alert)."""
    address = auditlog_address(args)

    async def verify() -> audit_pb2.VerifyChainResponse:
        async with open_channel(address, client_tls(args)) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            return await stub.VerifyChain(
                audit_pb2.VerifyChainRequest(tenant=args.tenant or ""), timeout=args.timeout
            )

    reply = asyncio.run(verify())
    broken = [chain for chain in reply.chains if not chain.intact]
    if args.json:
        print(json.dumps([to_dict(c) for c in reply.chains], indent=2))
        return 5 if broken else 0
    table = Table(title=f"audit chains in {address}")
    for column in ("tenant", "events", "head", "head hash", "status"):
        table.add_column(column)
    for chain in reply.chains:
        status = "[green]intact[/green]"
        if not chain.intact:
            where = chain.first_break
            status = (
                f"[red]BROKEN[/red] at #{where.chain_index}"
                + (
                    f" (event {where.event_id}, sequence {where.sequence})"
                    if where.event_id
                    else ""
                )
                + f": {where.problem}"
            )
        table.add_row(
            chain.tenant, str(chain.events_checked), str(chain.head_index), chain.head_hash, status
        )
    console.print(table)
    if not reply.chains:
        console.print("no audit events stored yet")
    return 5 if broken else 0


def cmd_providers(args: argparse.Namespace) -> int:
    address = args.registry or mesh_state(args.data_dir).get("registry", "127.0.0.1:50051")

    async def fetch() -> registry_pb2.ListProvidersResponse:
        async with open_channel(address, client_tls(args)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            return await stub.ListProviders(
                registry_pb2.ListProvidersRequest(), timeout=args.timeout
            )

    reply = asyncio.run(fetch())
    if args.json:
        print(json.dumps([to_dict(p) for p in reply.providers], indent=2))
        return 0
    table = Table(title=f"providers in {address}")
    for column in ("provider", "endpoint", "version", "health", "actions", "lease expires"):
        table.add_column(column)
    for provider in reply.providers:
        table.add_row(
            provider.provider_id,
            provider.endpoint,
            provider.version,
            enum_label("PROVIDER_HEALTH_", registry_pb2.ProviderHealth.Name(provider.health)),
            ", ".join(a.action_id for a in provider.actions),
            provider.lease_expires_at.ToDatetime().strftime("%H:%M:%S"),
        )
    console.print(table)
    return 0


# -- parser --------------------------------------------------------------------
def supportdesk_url(args: argparse.Namespace) -> str:
    """The local mesh's support desk: --url, else what `actionmesh up` recorded."""
    url = args.url or os.environ.get("ACTIONMESH_SUPPORTDESK_URL") or ""
    url = url or str(mesh_state(args.data_dir).get("supportdesk") or "")
    if not url:
        raise CliError(
            f"no support desk known: start the mesh (`actionmesh up --data-dir {args.data_dir}`) "
            "or pass --url"
        )
    return url.rstrip("/")


def cmd_demo_acknowledge(args: argparse.Namespace) -> int:
    """Play the support team: acknowledge an escalation at the stand-in support desk, so a
    long-running escalation finishes (SUCCEEDED with the ticket)."""
    escalation_id = args.escalation_id
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", escalation_id):
        raise CliError(f"{escalation_id!r} is not an escalation id (e.g. SD-0A1B2C3D4E5F)")
    url = f"{supportdesk_url(args)}/v1/escalations/{escalation_id}/acknowledge"
    request = urllib.request.Request(
        url,
        data=json.dumps({"by": args.by}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    # No proxies: the support desk is the local mesh's.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=args.timeout) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as refused:
        try:
            message = json.loads(refused.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = refused.reason
        raise CliError(f"the support desk refused ({refused.code}): {message}") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"the support desk at {url} did not answer: {exc}") from None
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(
            f"{body.get('id', escalation_id)} acknowledged by {body.get('acknowledged_by')} "
            f"at {body.get('acknowledged_at')} (status {body.get('status')})"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actionmesh", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="mesh data dir")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run registry, auditlog, gateway and providers locally")
    up.add_argument("--gateway-port", type=int, default=50050)
    up.add_argument("--registry-port", type=int, default=50051)
    up.add_argument("--auditlog-port", type=int, default=50052)
    up.add_argument(
        "--supportdesk-port", type=int, default=8780, help="stand-in external platform (HTTP)"
    )
    up.add_argument(
        "--webhook-receiver-port",
        type=int,
        default=8790,
        help="local webhook receiver (HTTP) subscribed to tenant acme's notifications",
    )
    up.add_argument("--no-seed", action="store_true", help="do not seed demo records")
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between all services: makes a development CA and certificates "
        "under DATA_DIR/tls",
    )
    up.set_defaults(func=cmd_up)

    token = sub.add_parser("token", help="mint a development JWT (HS256, local key)")
    token.add_argument("--subject", required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--roles", default="operator", help="comma-separated roles")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds")
    token.add_argument("--key-file", help="signing key (default: the mesh's dev key)")
    token.add_argument("--json", action="store_true")
    token.set_defaults(func=cmd_token)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--gateway", help="gateway address (default: from the running mesh)")
        command.add_argument("--token", help="caller JWT (default: $ACTIONMESH_TOKEN)")
        command.add_argument("--timeout", type=float, default=15.0, help="seconds")
        command.add_argument("--json", action="store_true", help="machine-readable output")
        add_tls_flags(command)
        return command

    def with_record(command: argparse.ArgumentParser, *, optional: bool = False) -> None:
        command.add_argument(
            "record", nargs="?" if optional else None, help="TYPE/ID, e.g. workitem/wi-1001"
        )
        # What the caller sees; a record type with a system of record is governed on the
        # source's facts whatever these say (see `actions`, which shows who vouched).
        command.add_argument("--status", default="", help="the record's status, e.g. failed")
        command.add_argument(
            "--version",
            default="",
            help="the record version you looked at; a newer one refuses with RECORD_CHANGED",
        )
        command.add_argument("--tenant", help="record tenant (default: the token's)")
        command.add_argument(
            "--sensitivity", default="normal", choices=["normal", "sensitive", "restricted"]
        )
        command.add_argument("--attr", action="append", help="KEY=VALUE record attribute")

    actions = client("actions", "discover the actions available for a record")
    with_record(actions)
    actions.set_defaults(func=cmd_actions)

    preview = client("preview", "show what an action would change, without running it")
    preview.add_argument("action", help="action id, e.g. ticket.change_service_level")
    with_record(preview)
    preview.add_argument("--input", action="append", help="NAME=VALUE input")
    preview.set_defaults(func=cmd_preview)

    run = client("run", "execute an action on a record")
    run.add_argument("action", help="action id, e.g. workitem.retry")
    with_record(run)
    run.add_argument("--input", action="append", help="NAME=VALUE input")
    run.add_argument("--idempotency-key", help="default: a fresh UUID")
    run.set_defaults(func=cmd_run)

    history = client("history", "show a record's audit timeline")
    history.add_argument("record", help="TYPE/ID")
    history.add_argument("--limit", type=int, default=100)
    history.add_argument(
        "--include-discovery",
        action="store_true",
        help="also show discovery decisions (what policy showed or hid)",
    )
    history.set_defaults(func=cmd_history)

    execution = client("execution", "show one execution (approval, late result)")
    execution.add_argument("execution_id")
    execution.set_defaults(func=cmd_execution)

    approvals = client("approvals", "list executions waiting for your approval")
    approvals.add_argument("--record", help="only this record (TYPE/ID)")
    approvals.add_argument("--limit", type=int, default=50)
    approvals.set_defaults(func=cmd_approvals)

    approve = client("approve", "approve a pending execution, which then runs")
    approve.add_argument("execution_id")
    # Only for record types without a system of record: the gateway asks the source.
    with_record(approve, optional=True)
    approve.add_argument("--comment", help="why it is fine")
    approve.set_defaults(func=cmd_approve)

    reject = client("reject", "reject a pending execution")
    reject.add_argument("execution_id")
    reject.add_argument("--comment", required=True, help="why not")
    reject.set_defaults(func=cmd_reject)

    cancel = client("cancel", "ask a running long-running execution to stop")
    cancel.add_argument("execution_id")
    cancel.add_argument("--comment", required=True, help="why it must stop")
    cancel.set_defaults(func=cmd_cancel)

    resolve = client(
        "resolve",
        "record what became of an execution the gateway could not settle "
        "(what the provider's system shows)",
    )
    resolve.add_argument("execution_id")
    resolve.add_argument(
        "--outcome",
        required=True,
        choices=["succeeded", "rejected", "partial", "cancelled", "unavailable"],
        help="what happened (unavailable: nothing ran, the same key may run again)",
    )
    resolve.add_argument("--comment", required=True, help="how you know")
    resolve.add_argument("--ref", help="its reference in the external system")
    resolve.set_defaults(func=cmd_resolve)

    policy = client("policy", "show the policy file in force and any reload error")
    policy.set_defaults(func=cmd_policy)

    trace = client("trace", "show every audit event of one trace id")
    trace.add_argument("trace_id", help="32 hex digits, as shown by `execution` or in Jaeger")
    trace.add_argument("--limit", type=int, default=100)
    trace.set_defaults(func=cmd_trace)

    executions = client("executions", "list executions: who ran what, and how it ended")
    executions.add_argument("--actor", help="requester or approver subject")
    executions.add_argument("--action", help="action id")
    executions.add_argument(
        "--outcome", action="append", help="e.g. succeeded, denied, partial (repeatable)"
    )
    executions.add_argument("--record", help="only this record (TYPE/ID)")
    executions.add_argument("--since", help="started at or after: ISO 8601 time or 30m/2h/7d ago")
    executions.add_argument("--until", help="started before: ISO 8601 time or 30m/2h/7d ago")
    executions.add_argument("--limit", type=int, default=50)
    executions.add_argument("--page-token", help="continue a listing")
    executions.add_argument(
        "--unresolved",
        action="store_true",
        help="only executions whose outcome still needs an answer (the gateway is asking "
        "the provider, or a person must check); exit 3 when one needs attention",
    )
    executions.set_defaults(func=cmd_executions)

    notifications = client(
        "notifications",
        "the webhook notification delivery log of your tenant (role supervisor or admin); "
        "exit 3 when a listed delivery failed for good",
    )
    notifications.add_argument(
        "--failed", action="store_true", help="only deliveries that failed and are not delivered"
    )
    notifications.add_argument("--subscription", help="only this subscription id")
    notifications.add_argument("--limit", type=int, default=50)
    notifications.add_argument("--page-token", help="continue a listing")
    notifications.set_defaults(func=cmd_notifications)

    audit = sub.add_parser("audit", help="operator tools for the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="recompute the per-tenant hash chains; exit 5 if one is broken"
    )
    verify.add_argument("--tenant", help="only this tenant (default: every tenant)")
    verify.add_argument("--auditlog", help="audit log address (default: from the running mesh)")
    verify.add_argument("--timeout", type=float, default=120.0, help="seconds")
    verify.add_argument("--json", action="store_true")
    add_tls_flags(verify)
    verify.set_defaults(func=cmd_audit_verify)

    providers = client("providers", "list registered providers and their health")
    providers.add_argument("--registry", help="registry address (default: from the running mesh)")
    providers.set_defaults(func=cmd_providers)

    demo = sub.add_parser("demo", help="play the external systems of the local demo mesh")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    acknowledge = demo_sub.add_parser(
        "acknowledge",
        help="acknowledge an escalation at the stand-in support desk (as its support team)",
    )
    acknowledge.add_argument("escalation_id", help="the escalation's id, e.g. SD-0A1B2C3D4E5F")
    acknowledge.add_argument("--by", default="support-team", help="who acknowledges it")
    acknowledge.add_argument("--url", help="support desk URL (default: from the running mesh)")
    acknowledge.add_argument("--timeout", type=float, default=10.0, help="seconds")
    acknowledge.add_argument("--json", action="store_true", help="machine-readable output")
    acknowledge.set_defaults(func=cmd_demo_acknowledge)

    add_provider_commands(sub)
    add_db_commands(sub)
    add_registry_commands(sub)
    add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except CliError as exc:
        console.print(f"[red]error:[/red] {exc}")
        code = 1
    except (ActionMeshError, grpc.RpcError) as exc:
        # The gateway's refusals come typed from the client; the audit log's and
        # registry's (plain stubs) are typed here the same way.
        error = exc if isinstance(exc, ActionMeshError) else from_rpc_error(exc)
        console.print(f"[red]{error.code.name}[/red] {error.message}")
        if error.reason:
            console.print(f"  reason: {error.reason}")
        for violation in error.violations:
            console.print(f"  {violation.field}: {violation.description}")
        if error.retry_after_s is not None:
            console.print(f"  retry after {error.retry_after_s:.1f}s")
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
