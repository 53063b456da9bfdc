"""The conformance kit: it passes the example providers and fails a broken one, clearly."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from actionmesh.conformance import (
    CHECKS,
    FAIL,
    PASS,
    SKIP,
    CheckResult,
    SampleRecord,
    failed,
    invalid_cases,
    render_table,
    run_checks,
    valid_inputs,
)
from actionmesh.mesh import Mesh
from actionmesh.providers.workitems import WorkItemStore, workitems
from actionmesh.rpc.errors import ActionMeshError
from actionmesh.rpc.schema import validate_inputs
from actionmesh.rpc.server import RunningServer
from actionmesh.sdk import ProviderConfig, start_provider
from actionmesh.v1 import common_pb2
from tests.broken_provider import READY, BrokenServer, Flaws, start_broken_provider

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
FAILED_ITEM = SampleRecord.parse("acme/workitem/wi-1001:failed")
BROKEN_ITEM = SampleRecord("acme", "thing", "t-1", READY)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def statuses(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.status for r in results}


def table_text(results: list[CheckResult]) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(render_table(results, title="conformance"))
    return console.export_text()


@pytest.fixture
async def workitems_server(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, ProviderConfig]]:
    # No registry: start_provider then skips registration entirely.
    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path), seed_demo=True)
    server = await start_provider(workitems, config)
    try:
        yield server, config
    finally:
        await server.stop(grace_s=1.0)


@pytest.fixture
async def broken() -> AsyncIterator[BrokenServer]:
    server = await start_broken_provider()
    try:
        yield server
    finally:
        await server.stop()


async def test_workitems_passes_every_check_and_acts_exactly_once(
    workitems_server: tuple[RunningServer, ProviderConfig],
) -> None:
    server, config = workitems_server
    results = await run_checks(server.address, records=[FAILED_ITEM], require_all=True)

    assert [r.name for r in results] == list(CHECKS)
    assert statuses(results) == dict.fromkeys(CHECKS, PASS), table_text(results)
    assert not failed(results)
    assert "SUCCEEDED" in by_name(results)["execute.idempotent"].detail
    # The provider's own store proves the kit's repeated key acted once, and that
    # none of the refused probes touched anything.
    store = WorkItemStore.open(config.database_url_for(workitems.id))
    try:
        item = store.get("acme", "wi-1001")
        assert item is not None and item.status == "processed"
        attempts = store.attempts("acme", "wi-1001")
        assert len(attempts) == 1 and attempts[0].idempotency_key.startswith("conformance-")
        untouched = [store.get("acme", item_id) for item_id in ("wi-1002", "wi-1003")]
        assert [item.status if item else None for item in untouched] == ["stuck", "processed"]
    finally:
        store.close()


async def test_without_an_eligible_record_the_side_effecting_check_is_skipped(
    workitems_server: tuple[RunningServer, ProviderConfig],
) -> None:
    server, _ = workitems_server
    results = by_name(await run_checks(server.address))
    assert results["execute.idempotent"].status == SKIP
    assert "--record" in results["execute.idempotent"].detail
    assert all(r.status == PASS for name, r in results.items() if name != "execute.idempotent")

    processed = SampleRecord.parse("acme/workitem/wi-1003:processed")
    results = by_name(await run_checks(server.address, records=[processed]))
    assert results["execute.idempotent"].status == SKIP
    assert "STATUS_NOT_FAILED" in results["execute.idempotent"].detail

    strict = await run_checks(server.address, records=[processed], require_all=True)
    assert by_name(strict)["execute.idempotent"].status == FAIL
    assert failed(strict)


async def test_a_chosen_action_with_invalid_sample_inputs_is_not_executed(
    workitems_server: tuple[RunningServer, ProviderConfig],
) -> None:
    server, config = workitems_server
    results = by_name(
        await run_checks(
            server.address,
            records=[FAILED_ITEM],
            action="workitem.retry",
            inputs={"priority": "urgent"},
        )
    )
    assert results["execute.idempotent"].status == SKIP
    assert "inputs.priority" in results["execute.idempotent"].detail
    store = WorkItemStore.open(config.database_url_for(workitems.id))
    try:
        assert store.attempts("acme", "wi-1001") == []
    finally:
        store.close()

    undeclared = by_name(await run_checks(server.address, records=[FAILED_ITEM], action="x.y"))
    assert undeclared["execute.idempotent"].status == FAIL


async def test_the_broken_provider_fails_with_a_clear_table(broken: BrokenServer) -> None:
    results = await run_checks(broken.address, records=[BROKEN_ITEM], timeout_s=3.0)
    found = by_name(results)
    assert failed(results)
    assert statuses(results) == {
        "health": FAIL,
        "describe": PASS,
        "discover.declared_only": FAIL,
        "discover.stable": FAIL,
        "discover.side_effect_free": FAIL,
        "execute.unknown_action": FAIL,
        "execute.idempotency_key_required": FAIL,
        "execute.invalid_inputs": FAIL,
        "execute.tenant_mismatch": FAIL,
        "execute.idempotent": FAIL,
    }
    assert "no grpc.health.v1 Health service" in found["health"].detail
    assert "undeclared action 'thing.ghost'" in found["discover.declared_only"].detail
    assert "BUSY_" in found["discover.stable"].detail
    assert "answered OK (SUCCEEDED)" in found["execute.unknown_action"].detail
    assert "the same idempotency key got another answer" in found["execute.idempotent"].detail
    assert "[SUCCEEDED, ref poke-" in found["execute.idempotent"].detail
    assert "reason missing" in found["execute.invalid_inputs"].detail
    # It really acted twice on the same key: that is what the kit reported.
    assert len(broken.servicer.executed) > len(set(broken.servicer.executed))

    text = table_text(results)
    assert "[thing.ghost yes, thing.poke no (BUSY_" in " ".join(text.split())
    for name in CHECKS:
        assert name in text
    assert text.count("FAIL") == 9 and "1 passed, 9 failed, 0 skipped" in text


async def test_bare_statuses_and_a_bad_describe_are_failures() -> None:
    server = await start_broken_provider(
        Flaws(
            no_health=False,
            undeclared_discover=False,
            unstable_discover=False,
            executes_unknown_actions=False,
            no_validation=False,
            ignores_tenant=False,
            acts_twice=False,
            bare_errors=True,
            bad_describe=True,
        )
    )
    try:
        found = by_name(await run_checks(server.address, records=[BROKEN_ITEM], timeout_s=3.0))
    finally:
        await server.stop()
    assert found["health"].status == PASS
    describe = found["describe"].detail
    assert found["describe"].status == FAIL
    assert "version is empty" in describe
    assert "declared more than once" in describe
    assert "'Not An Id': id must match" in describe
    for name in ("execute.unknown_action", "execute.tenant_mismatch"):
        assert found[name].status == FAIL
        assert "without google.rpc.Status details" in found[name].detail
    assert found["execute.invalid_inputs"].status == FAIL
    assert found["execute.idempotent"].status == PASS


async def test_a_provider_without_the_sdk_can_pass() -> None:
    server = await start_broken_provider(Flaws.none())
    try:
        results = await run_checks(server.address, records=[BROKEN_ITEM], require_all=True)
    finally:
        await server.stop()
    assert statuses(results) == dict.fromkeys(CHECKS, PASS), table_text(results)
    assert server.servicer.executed and len(set(server.servicer.executed)) == 1


async def test_an_unreachable_provider_fails_fast() -> None:
    results = await run_checks("127.0.0.1:1", timeout_s=1.0)
    found = by_name(results)
    assert found["health"].status == FAIL and "UNAVAILABLE" in found["health"].detail
    assert found["describe"].status == FAIL
    assert all(found[name].status == SKIP for name in list(CHECKS)[2:])


def test_generated_inputs_are_valid_and_each_invalid_case_breaks_its_input() -> None:
    fields = [
        common_pb2.InputField(
            name="reason", type=common_pb2.INPUT_TYPE_STRING, required=True, min_length=20
        ),
        common_pb2.InputField(
            name="count",
            type=common_pb2.INPUT_TYPE_INTEGER,
            required=True,
            minimum=2.5,
            maximum=7,
        ),
        common_pb2.InputField(
            name="ratio", type=common_pb2.INPUT_TYPE_NUMBER, required=True, maximum=-1
        ),
        common_pb2.InputField(
            name="mode", type=common_pb2.INPUT_TYPE_ENUM, required=True, allowed_values=["a", "b"]
        ),
        common_pb2.InputField(name="flag", type=common_pb2.INPUT_TYPE_BOOLEAN, required=False),
    ]
    valid = valid_inputs(fields)
    assert validate_inputs(fields, valid) == {
        "reason": "conformance checkxxx",
        "count": 3,
        "ratio": -1.0,
        "mode": "a",
    }
    cases = invalid_cases(fields)
    assert {c.label for c in cases} >= {
        "reason missing",
        "reason shorter than min_length",
        "count below minimum",
        "count above maximum",
        "ratio above maximum",
        "mode not an allowed value",
        "flag of the wrong type",
        "an undeclared input",
    }
    for case in cases:
        with pytest.raises(ActionMeshError) as refused:
            validate_inputs(fields, case.inputs)
        names = [v.field for v in refused.value.violations]
        assert any(case.field in name for name in names), (case.label, names)


@pytest.mark.parametrize(
    "text",
    ["acme/workitem", "acme/workitem/wi 1", "/workitem/wi-1", "a/b/c/d"],
)
def test_malformed_sample_records_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="TENANT/TYPE/ID"):
        SampleRecord.parse(text)


async def test_the_health_probe_module(
    workitems_server: tuple[RunningServer, ProviderConfig], broken: BrokenServer
) -> None:
    async def probe(address: str) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "actionmesh.rpc.health",
            address,
            "--timeout",
            "2",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=20)
        assert output.decode().strip() in ("SERVING", "NOT SERVING")
        assert process.returncode is not None
        return process.returncode

    server, _ = workitems_server
    assert await probe(server.address) == 0
    assert await probe(broken.address) == 1


def test_results_serialise_for_json() -> None:
    from actionmesh.conformance import as_dict

    report = as_dict("h:1", [CheckResult("health", FAIL, "no")])
    assert json.loads(json.dumps(report)) == {
        "address": "h:1",
        "passed": False,
        "summary": "0 passed, 1 failed, 0 skipped",
        "checks": [{"name": "health", "status": "fail", "detail": "no"}],
    }


# Each example provider as `actionmesh up` runs it (its own process, its own state), with
# a record it may really act on: the idempotency check executes the action once.
EXAMPLES = {
    "workitems": (
        "acme/workitem/wi-1004:stuck",
        "workitem.reprocess_email",
        {"reason": "conformance run"},
    ),
    "records": (
        "acme/ticket/t-102:pending",
        "ticket.link",
        {"target_type": "customer", "target_id": "c-101", "reason": "conformance run"},
    ),
    "escalation": (
        "acme/ticket/t-101:open",
        "case.escalate",
        {"summary": "conformance run of the escalation provider", "severity": "low"},
    ),
}


@pytest.mark.parametrize("provider", sorted(EXAMPLES))
def test_every_example_provider_passes_the_kit_from_the_command_line(
    mesh: Mesh, provider: str
) -> None:
    record, action, inputs = EXAMPLES[provider]
    command = [
        sys.executable,
        "-m",
        "actionmesh.cli",
        "provider",
        "check",
        mesh.address(provider),
        "--record",
        record,
        "--action",
        action,
        "--require-all",
        "--json",
    ]
    for name, value in inputs.items():
        command += ["--input", f"{name}={value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    assert {c["name"]: c["status"] for c in report["checks"]} == {name: PASS for name in CHECKS}
