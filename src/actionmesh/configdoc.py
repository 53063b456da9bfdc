"""Generate docs/configuration.md, the one table of every setting, from the config classes.

Each service reads its settings with :func:`actionmesh.rpc.config.load_config`
from a frozen dataclass, so the field docstrings already are the documentation.
This module renders them, with the environment variable and flag names
``load_config`` derives, plus the few process-wide variables read outside the
config classes (logging, tracing, the ``actionmesh`` command line)::

    python -m actionmesh.configdoc            # rewrite docs/configuration.md
    python -m actionmesh.configdoc --check    # exit 1 when the committed file is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.db_cli import ENV_PREFIXES
from actionmesh.gateway.config import GatewayConfig
from actionmesh.providers.escalation.config import ENV_PREFIX as ESCALATION_PREFIX
from actionmesh.providers.escalation.config import EscalationConfig
from actionmesh.providers.supportdesk.config import ENV_PREFIX as SUPPORTDESK_PREFIX
from actionmesh.providers.supportdesk.config import SupportDeskConfig
from actionmesh.registry.config import ENV_PREFIX as REGISTRY_PREFIX
from actionmesh.registry.config import RegistryConfig
from actionmesh.rpc.config import env_name, field_docs
from actionmesh.rpc.telemetry import EXPORTER_ENV, STANDARD_EXPORTER_ENV
from actionmesh.sdk.config import ENV_PREFIX as PROVIDER_PREFIX
from actionmesh.sdk.config import ProviderConfig
from actionmesh.webhook_receiver import ENV_PREFIX as RECEIVER_PREFIX
from actionmesh.webhook_receiver import WebhookReceiverConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = REPO_ROOT / "docs" / "configuration.md"
# Defaults that are files inside an installed actionmesh package (a checkout or
# site-packages) are shown from the ``actionmesh`` folder on, so the table is the
# same on every machine.
NAMESPACE = "actionmesh"


@dataclass(frozen=True)
class ConfigSection:
    """One process's settings: a config dataclass and the prefix of its variables."""

    title: str
    command: str
    """How the process is started (shown above its table)."""
    cls: type
    env_prefix: str
    flags: bool = True
    """Whether the settings are also flags (false: environment only)."""
    note: str = ""


@dataclass(frozen=True)
class EnvVar:
    """A variable read outside the config classes."""

    name: str
    used_by: str
    default: str
    description: str


SECTIONS: tuple[ConfigSection, ...] = (
    ConfigSection("Registry", "python -m actionmesh.registry", RegistryConfig, REGISTRY_PREFIX),
    ConfigSection(
        "Audit log", "python -m actionmesh.auditlog", AuditLogConfig, ENV_PREFIXES["auditlog"]
    ),
    ConfigSection(
        "Gateway", "python -m actionmesh.gateway", GatewayConfig, ENV_PREFIXES["gateway"]
    ),
    ConfigSection(
        "Providers (every provider built with the SDK)",
        "python -m actionmesh.providers.workitems",
        ProviderConfig,
        PROVIDER_PREFIX,
        note="The same settings for actionmesh.providers.records, "
        "actionmesh.providers.escalation and any provider a team builds with the SDK "
        "(`serve(provider)`).",
    ),
    ConfigSection(
        "Escalation provider (in addition to the provider settings)",
        "python -m actionmesh.providers.escalation",
        EscalationConfig,
        ESCALATION_PREFIX,
        flags=False,
        note="Environment only: the provider SDK owns the command line.",
    ),
    ConfigSection(
        "Support desk (the stand-in external platform, HTTP)",
        "python -m actionmesh.providers.supportdesk",
        SupportDeskConfig,
        SUPPORTDESK_PREFIX,
    ),
    ConfigSection(
        "Webhook receiver (the local receiver of notifications, HTTP)",
        "python -m actionmesh.webhook_receiver",
        WebhookReceiverConfig,
        RECEIVER_PREFIX,
    ),
)

PROCESS_VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(
        "ACTIONMESH_LOG_LEVEL",
        "every service",
        "`INFO`",
        "Python logging level of the service (DEBUG, INFO, WARNING, ERROR).",
    ),
    EnvVar(
        EXPORTER_ENV,
        "every service",
        "`none`",
        "Trace exporter: `none` (trace ids still propagate and land in audit records), "
        "`console` (JSON spans on stdout) or `otlp` (OTLP/gRPC to a collector).",
    ),
    EnvVar(
        STANDARD_EXPORTER_ENV,
        "every service",
        "unset",
        f"OpenTelemetry's own exporter variable, used when {EXPORTER_ENV} is unset.",
    ),
    EnvVar(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "every service (otlp)",
        "`http://localhost:4317`",
        "Collector address; `http://` is plain text, `https://` is TLS.",
    ),
    EnvVar(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "every service (otlp)",
        "unset",
        "Collector address for traces only; wins over OTEL_EXPORTER_OTLP_ENDPOINT.",
    ),
    EnvVar(
        "OTEL_EXPORTER_OTLP_HEADERS",
        "every service (otlp)",
        "unset",
        "Headers sent to the collector, `key=value` pairs separated by commas "
        "(values URL-encoded), e.g. an authorization token.",
    ),
    EnvVar(
        "OTEL_EXPORTER_OTLP_INSECURE",
        "every service (otlp)",
        "`false`",
        "Plain text to an endpoint given without a scheme.",
    ),
    EnvVar(
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "every service (otlp)",
        "`10`",
        "Seconds one export may take.",
    ),
    EnvVar(
        "OTEL_TRACES_SAMPLER",
        "every service",
        "`parentbased_always_on`",
        "OpenTelemetry sampler (with OTEL_TRACES_SAMPLER_ARG); batching follows OTEL_BSP_*.",
    ),
)

CLI_VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(
        "ACTIONMESH_DATA_DIR",
        "`actionmesh` command",
        "`.actionmesh`",
        "Data directory of `actionmesh up` (state file, SQLite files, development keys).",
    ),
    EnvVar(
        "ACTIONMESH_GATEWAY",
        "`actionmesh` client commands",
        "the mesh's gateway, else `127.0.0.1:50050`",
        "Gateway address (host:port) the client commands call.",
    ),
    EnvVar(
        "ACTIONMESH_AUDITLOG",
        "`actionmesh audit` commands",
        "the mesh's audit log, else `127.0.0.1:50052`",
        "Audit log address (host:port) the audit commands call.",
    ),
    EnvVar(
        "ACTIONMESH_TOKEN",
        "`actionmesh` client commands",
        "unset",
        "Caller JWT sent as the bearer token (see `actionmesh token`).",
    ),
    EnvVar(
        "ACTIONMESH_TLS_CA",
        "`actionmesh` client commands",
        "the mesh's (`up --tls`), else plaintext",
        "CA certificate (PEM) the server's certificate must chain to; turns TLS on (`--tls-ca`).",
    ),
    EnvVar(
        "ACTIONMESH_TLS_CERT",
        "`actionmesh` client commands",
        "the mesh's (`up --tls`), else none",
        "Client certificate (PEM) presented to services that require one (`--tls-cert`).",
    ),
    EnvVar(
        "ACTIONMESH_TLS_KEY",
        "`actionmesh` client commands",
        "the mesh's (`up --tls`), else none",
        "Private key (PEM) of ACTIONMESH_TLS_CERT (`--tls-key`).",
    ),
)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return f"{names} (optional)" if len(args) < len(typing.get_args(annotation)) else names
    if origin is tuple:
        return "comma-separated list"
    return getattr(annotation, "__name__", str(annotation))


def _default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        path = Path(value)
        if path.is_absolute() and NAMESPACE in path.parts[:-1]:
            start = len(path.parts) - 1 - path.parts[::-1].index(NAMESPACE)
            return f"`{Path(*path.parts[start:]).as_posix()}` (bundled with the package)"
        return f"`{value}`" if value else '`""` (empty)'
    return f"`{value!r}`"


def _cell(text: str) -> str:
    # A literal pipe would end the table cell.
    return text.replace("|", "\\|")


def config_rows(section: ConfigSection) -> Iterator[tuple[str, str, str, str, str]]:
    """(variable, flag, type, default, description) of each field of ``section``."""
    docs = field_docs(section.cls)
    hints = typing.get_type_hints(section.cls)
    for f in dataclasses.fields(section.cls):
        flag = f"`--{f.name.replace('_', '-')}`" if section.flags else "-"
        yield (
            f"`{env_name(section.env_prefix, f.name)}`",
            flag,
            _type_name(hints[f.name]),
            _default(f.default),
            docs.get(f.name, ""),
        )


def config_env_names() -> dict[str, ConfigSection]:
    """Every ``<PREFIX>_<FIELD>`` variable a config class reads, with its section."""
    return {
        env_name(section.env_prefix, f.name): section
        for section in SECTIONS
        for f in dataclasses.fields(section.cls)
    }


def documented_env_names() -> set[str]:
    """Every variable in the table: config fields and the process-wide variables."""
    return set(config_env_names()) | {v.name for v in (*PROCESS_VARIABLES, *CLI_VARIABLES)}


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _env_table(variables: tuple[EnvVar, ...]) -> list[str]:
    return _table(
        ("variable", "used by", "default", "description"),
        [(f"`{v.name}`", v.used_by, v.default, v.description) for v in variables],
    )


def render() -> str:
    """The full text of docs/configuration.md."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m actionmesh.configdoc` from the config classes; do not",
        "     edit by hand. The test suite fails when this file is stale. -->",
        "",
        "Every service is configured by flags or, equivalently, environment variables "
        "(the only way in containers). A flag wins over its variable, the variable over "
        "the default. Booleans accept `true/false`, `1/0`, `yes/no`, `on/off`.",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## {section.title}", "", f"`{section.command}`", ""]
        if section.note:
            lines += [section.note, ""]
        rows = list(config_rows(section))
        lines += _table(("variable", "flag", "type", "default", "description"), rows)
        lines.append("")
    lines += [
        "## Every process: logging and tracing",
        "",
        *_env_table(PROCESS_VARIABLES),
        "",
        "## The `actionmesh` command line",
        "",
        "`actionmesh db` also reads each service's `*_DATABASE_URL` variable above.",
        "",
        *_env_table(CLI_VARIABLES),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actionmesh.configdoc", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when docs/configuration.md is stale"
    )
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="file to write or check")
    args = parser.parse_args(argv)
    fresh = render()
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != fresh:
            print(f"{args.output} is stale; run python -m actionmesh.configdoc", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(fresh)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
