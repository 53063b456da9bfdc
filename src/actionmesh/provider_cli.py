"""``actionmesh provider``: create, serve and check providers.

    actionmesh provider new tickets --dir .          # a provider project from the template
    actionmesh provider serve tickets.provider:provider --port 50061 --seed-demo true
    actionmesh provider check 127.0.0.1:50061 --record acme/ticket/t-1:open

``serve`` runs any SDK provider exactly like its own ``python -m`` entry point
(flags or ACTIONMESH_PROVIDER_* variables). ``check`` runs the conformance kit
against any running provider, SDK-built or not, and exits 1 when a check fails.
:func:`add_provider_commands` plugs the group into the ``actionmesh`` parser;
``python -m actionmesh.provider_cli provider ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import keyword
import os
import re
import sys
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from actionmesh.conformance import (
    CHECKS,
    SampleRecord,
    as_dict,
    failed,
    render_table,
    run_checks,
    summary,
)
from actionmesh.rpc.tls import TlsConfig, TlsConfigError

if TYPE_CHECKING:
    from actionmesh.sdk import Provider

PROJECT_NAME = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
TEMPLATE_SUFFIX = ".tmpl"
PLACEHOLDER = "{{name}}"
# Top-level packages a provider project imports: actionmesh ships only its namespace,
# the SDK needs grpc, protobuf (google) and OpenTelemetry; tests is the project's own.
TAKEN_NAMES = frozenset(
    {
        "actionmesh",
        "tests",
        "grpc",
        "grpc_health",
        "grpc_reflection",
        "grpc_status",
        "google",
        "opentelemetry",
        "tenacity",
    }
)
# Template files whose real name starts with a dot (globs in package data skip dotfiles).
DOTFILES = {"dockerignore": ".dockerignore"}


class ProviderCliError(Exception):
    """A user-facing failure of a provider command: printed without a traceback."""


def _console() -> Console:
    # Built per command so the width follows the environment of the call (COLUMNS).
    return Console()


def _fail(message: str) -> int:
    _console().print(f"[red]error:[/red] {escape(message)}")
    return 1


# -- serve ---------------------------------------------------------------------
def load_provider(target: str) -> Provider:
    """Import ``module:attr`` (or ``module`` holding exactly one Provider) and return it."""
    # Imported here: the SDK (and its database layer) is only needed by `serve`.
    from actionmesh.sdk import Provider

    module_name, _, attr = target.partition(":")
    if not module_name:
        raise ProviderCliError(
            "expected MODULE:ATTRIBUTE, e.g. actionmesh.providers.workitems:workitems"
        )
    # Like `python -m`, the current directory is importable, so a provider project
    # can be served from its own folder without installing it.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProviderCliError(f"cannot import {module_name}: {exc}") from exc
    if attr:
        try:
            found: Any = module
            for part in attr.split("."):
                found = getattr(found, part)
        except AttributeError:
            raise ProviderCliError(f"{module_name} has no attribute {attr!r}") from None
        if not isinstance(found, Provider):
            raise ProviderCliError(
                f"{target} is a {type(found).__name__}, not a actionmesh.sdk.Provider"
            )
        return found
    candidates = {name: v for name, v in vars(module).items() if isinstance(v, Provider)}
    if len(candidates) != 1:
        listed = ", ".join(sorted(candidates)) or "none"
        raise ProviderCliError(
            f"{module_name} holds {len(candidates)} Provider objects ({listed}); "
            f"name one as {module_name}:ATTRIBUTE"
        )
    return next(iter(candidates.values()))


def cmd_serve(args: argparse.Namespace) -> int:
    from actionmesh.sdk import serve

    try:
        provider = load_provider(args.target)
    except ProviderCliError as exc:
        return _fail(str(exc))
    options = list(args.options)
    if options[:1] == ["--"]:
        options = options[1:]
    # The provider's own parser (load_config) names itself after argv[0]; make its
    # usage line show the command that was actually typed.
    sys.argv[0] = f"actionmesh provider serve {args.target}"
    serve(provider, options)
    return 0


# -- check ---------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    try:
        records = [SampleRecord.parse(text) for text in args.record or []]
    except ValueError as exc:
        return _fail(str(exc))
    inputs: dict[str, str] = {}
    for item in args.input or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            return _fail(f"--input takes NAME=VALUE (got {item!r})")
        inputs[name] = value
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_ca)
    try:
        tls.check(server=False)
    except TlsConfigError as exc:
        return _fail(str(exc))
    results = asyncio.run(
        run_checks(
            args.address,
            records=records,
            action=args.action,
            inputs=inputs,
            timeout_s=args.timeout,
            require_all=args.require_all,
            tls=tls,
        )
    )
    if args.json:
        print(json.dumps(as_dict(args.address, results), indent=2))
    else:
        console = _console()
        console.print(render_table(results, title=f"provider conformance: {args.address}"))
        verdict = "[red]FAILED[/red]" if failed(results) else "[green]PASSED[/green]"
        console.print(f"{verdict}  {summary(results)}")
    return 1 if failed(results) else 0


# -- new -----------------------------------------------------------------------
def template_root() -> Traversable:
    """The provider project template shipped as package data."""
    return Path(__file__).resolve().parent / "templates" / "provider"


def _render_tree(source: Traversable, target: Path, name: str, written: list[Path]) -> None:
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        real = entry.name.replace(PLACEHOLDER, name)
        if entry.is_dir():
            (target / real).mkdir()
            _render_tree(entry, target / real, name, written)
            continue
        if not real.endswith(TEMPLATE_SUFFIX):
            continue
        real = real.removesuffix(TEMPLATE_SUFFIX)
        path = target / DOTFILES.get(real, real)
        path.write_text(entry.read_text(encoding="utf-8").replace(PLACEHOLDER, name))
        written.append(path)


def new_project(name: str, directory: Path) -> list[Path]:
    """Create ``directory/name`` from the template; return the files written."""
    if not PROJECT_NAME.match(name) or keyword.iskeyword(name):
        raise ProviderCliError(
            f"{name!r} is not a valid provider name: use a lower-case python identifier of "
            "2 to 63 characters starting with a letter (e.g. tickets, crm_sync)"
        )
    if name in sys.stdlib_module_names or name in TAKEN_NAMES:
        raise ProviderCliError(
            f"{name!r} would shadow the module {name} when imported; choose another name"
        )
    project = directory / name
    if project.exists():
        raise ProviderCliError(f"{project} already exists; not overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    project.mkdir()
    written: list[Path] = []
    _render_tree(template_root(), project, name, written)
    return written


def cmd_new(args: argparse.Namespace) -> int:
    try:
        written = new_project(args.name, args.dir)
    except ProviderCliError as exc:
        return _fail(str(exc))
    project = args.dir / args.name
    if args.json:
        print(json.dumps({"project": str(project), "files": [str(p) for p in written]}))
        return 0
    console = _console()
    console.print(f"created provider project [bold]{escape(str(project))}[/bold]:")
    for path in written:
        console.print(f"  {escape(str(path.relative_to(project)))}")
    # Plain print: these lines are meant to be copied, so they must not be re-wrapped.
    print(
        f"\nNext:\n  cd {project}\n  python -m pytest\n"
        f"  actionmesh provider serve {args.name}.provider:provider --port 50061\n"
        f"  actionmesh provider check 127.0.0.1:50061 --record acme/ticket/t-1:open",
        flush=True,
    )
    return 0


# -- parser --------------------------------------------------------------------
def add_provider_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``provider serve|check|new`` to the ``actionmesh`` sub-commands."""
    group = sub.add_parser("provider", help="create, serve and check action providers")
    commands = group.add_subparsers(dest="provider_command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run an SDK provider (flags or ACTIONMESH_PROVIDER_* variables configure it)",
        description="Run an SDK provider like its `python -m` entry point. Options after "
        "MODULE:ATTRIBUTE go to the provider: --host --port --registry --data-dir "
        "--seed-demo --ready-file ... (see `actionmesh provider serve MODULE:ATTR --help`).",
    )
    serve.add_argument(
        "target", help="MODULE:ATTRIBUTE, e.g. actionmesh.providers.workitems:workitems"
    )
    serve.add_argument("options", nargs=argparse.REMAINDER, help="provider options")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser(
        "check",
        help="run the conformance kit against a running provider",
        description="Run the contract checks against any provider over gRPC and print a "
        "table; exit 1 if a check fails. Checks: " + "; ".join(CHECKS) + ". Only "
        "execute.idempotent has a side effect: it EXECUTES the action once on the first "
        "--record Discover says is eligible (and is skipped without one). The source.* checks "
        "read (ResolveRecord) the --record of a type the provider is the system of record of; "
        "they do not apply to a provider that sources no type, even with --require-all. The "
        "status.* checks ask GetExecutionStatus about a key never sent and the key "
        "execute.idempotent executed; a provider answering UNIMPLEMENTED skips them as not "
        "supported, even with --require-all.",
    )
    check.add_argument("address", help="HOST:PORT of the provider")
    check.add_argument(
        "--record",
        action="append",
        help="TENANT/TYPE/ID[:STATUS] of a record the provider may act on or is the source "
        "of (repeatable)",
    )
    check.add_argument(
        "--action", help="action id execute.idempotent runs (default: first available)"
    )
    check.add_argument(
        "--input",
        action="append",
        help="NAME=VALUE input for that action (others: values derived from the schema)",
    )
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    check.add_argument(
        "--require-all",
        action="store_true",
        help="a skipped check fails too (one that does not apply to the provider stays skipped)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--tls-ca", default="", help="CA (PEM) of a provider serving TLS")
    check.add_argument("--tls-cert", default="", help="client certificate (PEM) to present")
    check.add_argument("--tls-key", default="", help="key (PEM) of --tls-cert")
    check.set_defaults(func=cmd_check)

    new = commands.add_parser(
        "new",
        help="create a provider project (package, test, Dockerfile)",
        description="Create NAME/ with a provider package, a test that runs the conformance "
        "kit, a Dockerfile, pyproject.toml and README.md.",
    )
    new.add_argument("name", help="lower-case python identifier, e.g. tickets")
    new.add_argument("--dir", type=Path, default=Path("."), help="parent directory (default: .)")
    new.add_argument("--json", action="store_true", help="machine-readable output")
    new.set_defaults(func=cmd_new)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the provider group: ``python -m actionmesh.provider_cli provider ...``."""
    parser = argparse.ArgumentParser(prog="actionmesh", description=__doc__.splitlines()[0])
    add_provider_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
