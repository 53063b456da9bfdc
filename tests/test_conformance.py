"""The conformance kit: it passes the example providers and fails a broken one, clearly."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
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
from actionmesh.providers.records import records
from actionmesh.providers.workitems import WorkItemStore, workitems
from actionmesh.rpc.errors import ActionMeshError
from actionmesh.rpc.records import resolved_record_violations
from actionmesh.rpc.schema import validate_inputs
from actionmesh.rpc.server import RunningServer
from actionmesh.sdk import (
    ActionContext,
    ExecutionStatus,
    Facts,
    NoInputs,
    Provider,
    ProviderConfig,
    Result,
    Risk,
    start_provider,
)
from actionmesh.v1 import common_pb2, provider_pb2
from tests.broken_provider import (
    READY,
    BrokenServer,
    Flaws,
    Previews,
    Source,
    start_broken_provider,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
FAILED_ITEM = SampleRecord.parse("acme/workitem/wi-1001:failed")
BROKEN_ITEM = SampleRecord("acme", "thing", "t-1", READY)
SOURCE_CHECKS = [name for name in CHECKS if name.startswith("source.")]
STATUS_CHECKS = [name for name in CHECKS if name.startswith("status.")]
# The status checks that ask about the key execute.idempotent executed (skipped without it).
EXECUTED_STATUS_CHECKS = ["status.finished", "status.tenant_isolation"]
# The source checks that read a sample record of a sourced type (skipped without one).
SAMPLE_SOURCE_CHECKS = ["source.tenant_isolation", "source.answer", "source.stable"]
LONG_RUNNING_CHECKS = [name for name in CHECKS if name.startswith("long_running.")]
# A provider without long-running actions skips these as not applicable.
NOT_LONG_RUNNING = dict.fromkeys(LONG_RUNNING_CHECKS, SKIP)
PREVIEW_CHECKS = [name for name in CHECKS if name.startswith("preview.")]
# A provider without previewable actions skips these as not applicable (a Preview of its
# actions is still checked to be UNIMPLEMENTED: preview.unsupported).
NOT_PREVIEWABLE = dict.fromkeys(
    ["preview.stable", "preview.read_only", "preview.matches_execute"], SKIP
)


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
    assert statuses(results) == {
        **dict.fromkeys(CHECKS, PASS),
        **NOT_LONG_RUNNING,
        **NOT_PREVIEWABLE,
    }, table_text(results)
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
    # Without a workitem to read, the source checks that read one are skipped too.
    for name in SAMPLE_SOURCE_CHECKS:
        assert results[name].status == SKIP
        assert "no sample record of a type it sources (workitem)" in results[name].detail
    for name in EXECUTED_STATUS_CHECKS:
        assert results[name].status == SKIP
        assert "no executed key to ask about" in results[name].detail
    skipped = [
        "execute.idempotent",
        *SAMPLE_SOURCE_CHECKS,
        *EXECUTED_STATUS_CHECKS,
        *LONG_RUNNING_CHECKS,
        *NOT_PREVIEWABLE,
    ]
    assert all(r.status == PASS for name, r in results.items() if name not in skipped)

    processed = SampleRecord.parse("acme/workitem/wi-1003:processed")
    results = by_name(await run_checks(server.address, records=[processed]))
    assert results["execute.idempotent"].status == SKIP
    assert "STATUS_NOT_FAILED" in results["execute.idempotent"].detail

    for name in SOURCE_CHECKS:
        assert results[name].status == PASS, results[name]

    strict = await run_checks(server.address, records=[processed], require_all=True)
    assert by_name(strict)["execute.idempotent"].status == FAIL
    assert failed(strict)
    unread = by_name(await run_checks(server.address, require_all=True))
    for name in SAMPLE_SOURCE_CHECKS:
        assert unread[name].status == FAIL and "skipped but required" in unread[name].detail


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
        # It sources no record type: the source checks do not apply.
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
        "execute.unknown_action": FAIL,
        "execute.idempotency_key_required": FAIL,
        "execute.invalid_inputs": FAIL,
        "execute.tenant_mismatch": FAIL,
        "execute.idempotent": FAIL,
        # It has no GetExecutionStatus: the status checks are not supported.
        **dict.fromkeys(STATUS_CHECKS, SKIP),
        **NOT_LONG_RUNNING,
        # It has no Preview: its action is not previewable, and Preview is UNIMPLEMENTED.
        "preview.unsupported": PASS,
        **NOT_PREVIEWABLE,
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
    assert text.count("FAIL") == 9 and "2 passed, 9 failed, 17 skipped" in text
    for name in STATUS_CHECKS:
        assert found[name].detail.startswith("not supported: GetExecutionStatus is UNIMPLEMENTED")


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
    # It is the system of record of nothing: the source checks do not apply, and
    # require_all does not fail it for that.
    assert statuses(results) == {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING, **NOT_PREVIEWABLE},
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
    }, table_text(results)
    assert not failed(results)
    for name in SOURCE_CHECKS:
        assert by_name(results)[name].detail.startswith("not applicable: ")
    assert server.servicer.executed and len(set(server.servicer.executed)) == 1

    server = await start_broken_provider(Flaws.none(), Source())
    try:
        results = await run_checks(server.address, records=[BROKEN_ITEM], require_all=True)
    finally:
        await server.stop()
    assert statuses(results) == {
        **dict.fromkeys(CHECKS, PASS),
        **NOT_LONG_RUNNING,
        **NOT_PREVIEWABLE,
    }, table_text(results)


async def test_a_raw_provider_with_a_correct_preview_passes_the_preview_checks() -> None:
    server = await start_broken_provider(Flaws.none(), previews=Previews())
    try:
        results = await run_checks(server.address, records=[BROKEN_ITEM], require_all=True)
    finally:
        await server.stop()
    assert statuses(results) == {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING},
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
        # Its one action is previewable: nothing is left to answer UNIMPLEMENTED.
        "preview.unsupported": SKIP,
    }, table_text(results)
    found = by_name(results)
    assert "Execute changed what the preview showed" in found["preview.matches_execute"].detail
    assert found["preview.unsupported"].detail.startswith("not applicable: ")


@pytest.mark.parametrize(
    ("previews", "checks", "says"),
    [
        (
            Previews(writes=True),
            {"preview.stable", "preview.read_only"},
            "Preview of thing.poke on acme/thing/t-1 changed: [digest 'pokes-",
        ),
        (
            Previews(unstable=True),
            {"preview.stable", "preview.read_only"},
            "the same Preview got another answer",
        ),
        (
            Previews(mismatched=True),
            {"preview.matches_execute"},
            "the preview showed pokes 0->2, Execute changed pokes 0->1",
        ),
        (
            Previews(undeclared=True),
            {"preview.unsupported"},
            "thing.poke is not previewable, but Preview answered digest",
        ),
    ],
    ids=["writes", "unstable-digest", "shows-another-change", "answers-undeclared"],
)
async def test_a_preview_breaking_one_rule_fails_that_check(
    previews: Previews, checks: set[str], says: str
) -> None:
    server = await start_broken_provider(Flaws.none(), previews=previews)
    try:
        results = await run_checks(server.address, records=[BROKEN_ITEM], require_all=True)
    finally:
        await server.stop()
    expected: dict[str, str] = {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING},
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
    }
    if previews.undeclared:
        expected.update(NOT_PREVIEWABLE)
    else:
        expected["preview.unsupported"] = SKIP
    expected.update(dict.fromkeys(checks, FAIL))
    assert statuses(results) == expected, table_text(results)
    details = " | ".join(by_name(results)[name].detail for name in checks)
    assert says in details, details


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


# -- record sources --------------------------------------------------------------
SOURCE_EXAMPLES = {"workitems": workitems, "records": records}


@pytest.mark.parametrize("name", sorted(SOURCE_EXAMPLES))
async def test_the_example_record_sources_pass_every_check(tmp_path: Path, name: str) -> None:
    record, action, inputs = EXAMPLES[name]
    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path), seed_demo=True)
    server = await start_provider(SOURCE_EXAMPLES[name], config)
    try:
        results = await run_checks(
            server.address,
            records=[SampleRecord.parse(record)],
            action=action,
            inputs=inputs,
            require_all=True,
        )
    finally:
        await server.stop(grace_s=1.0)
    assert statuses(results) == {
        **dict.fromkeys(CHECKS, PASS),
        **NOT_LONG_RUNNING,
        # records previews its changes: every preview check applies and passes.
        **({} if name == "records" else NOT_PREVIEWABLE),
    }, table_text(results)
    found = by_name(results)
    record_type = SampleRecord.parse(record).type
    assert found["source.declared"].detail == f"the system of record of {record_type}"
    assert "NOT_FOUND RECORD_NOT_FOUND" in found["source.unknown_record"].detail
    assert "NOT_FOUND RECORD_TYPE_NOT_SOURCED" in found["source.unsourced_type"].detail
    assert f"{record.split(':')[0]}: " in found["source.answer"].detail


GADGET = SampleRecord("acme", "gadget", "g-1", "open")
GADGETS = {
    ("acme", "g-1"): Facts(status="open", version="3", attributes={"colour": "blue"}),
    ("globex", "g-1"): Facts(status="closed", version="8"),
}
Resolve = Callable[[str, str], Awaitable[Facts | None]]


def gadget_source(resolve: Resolve) -> Provider:
    """An SDK provider of one action on gadgets, their system of record through ``resolve``."""
    provider = Provider("gadgets", version="1.0.0", dedupe=True)

    @provider.action("gadget.touch", record_types=["gadget"], risk=Risk.LOW)
    async def touch(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded(external_ref=f"touch-{ctx.record.id}")

    provider.record_source("gadget")(resolve)
    return provider


async def by_tenant(tenant: str, gadget_id: str) -> Facts | None:
    return GADGETS.get((tenant, gadget_id))


async def any_id(tenant: str, gadget_id: str) -> Facts | None:
    # Tenant-aware, but makes up a gadget for any id it is asked about.
    return GADGETS[("acme", "g-1")] if tenant == "acme" else None


async def any_tenant(tenant: str, gadget_id: str) -> Facts | None:
    # Looks gadgets up by id alone: another tenant gets acme's gadget.
    return GADGETS.get(("acme", gadget_id))


def counting() -> Resolve:
    reads = itertools.count(1)

    async def resolve(tenant: str, gadget_id: str) -> Facts | None:
        # The version counts the reads: the same question never gets the same answer.
        facts = GADGETS.get((tenant, gadget_id))
        return None if facts is None else dataclasses.replace(facts, version=str(next(reads)))

    return resolve


async def check_gadgets(tmp_path: Path, resolve: Resolve) -> list[CheckResult]:
    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path))
    server = await start_provider(gadget_source(resolve), config)
    try:
        return await run_checks(server.address, records=[GADGET], require_all=True)
    finally:
        await server.stop(grace_s=1.0)


async def test_an_sdk_record_source_that_keeps_the_contract_passes(tmp_path: Path) -> None:
    results = await check_gadgets(tmp_path, by_tenant)
    assert statuses(results) == {
        **dict.fromkeys(CHECKS, PASS),
        **NOT_LONG_RUNNING,
        **NOT_PREVIEWABLE,
    }, table_text(results)


@pytest.mark.parametrize(
    ("resolve", "check", "says"),
    [
        (any_id, "source.unknown_record", "probe gadget: answered a record (acme/gadget/"),
        (any_tenant, "source.tenant_isolation", "answered the record (conformance-other-"),
        (counting(), "source.stable", "acme/gadget/g-1: version '1' then '2'"),
    ],
    ids=["answers-unknown-ids", "leaks-across-tenants", "changes-between-calls"],
)
async def test_an_sdk_record_source_breaking_one_rule_fails_that_check_alone(
    tmp_path: Path, resolve: Resolve, check: str, says: str
) -> None:
    results = await check_gadgets(tmp_path, resolve)
    assert statuses(results) == {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING, **NOT_PREVIEWABLE},
        check: FAIL,
    }, table_text(results)
    assert says in by_name(results)[check].detail, by_name(results)[check].detail


@pytest.mark.parametrize(
    ("source", "check", "says"),
    [
        (
            Source(unversioned=True),
            "source.answer",
            "acme/thing/t-1: record.version is required",
        ),
        (
            Source(misdirected=True),
            "source.answer",
            "acme/thing/t-1 (answered acme/gadget/g-7): record.type must be the type asked for, "
            "record.id must be the id asked for",
        ),
        (
            Source(declares=("thing", "thing", "Not A Type")),
            "source.declared",
            "record type 'Not A Type' must match",
        ),
    ],
    ids=["without-version", "answers-another-record", "malformed-declaration"],
)
async def test_a_raw_record_source_breaking_one_rule_fails_that_check_alone(
    source: Source, check: str, says: str
) -> None:
    # Flaws the SDK would not let a provider have: a raw servicer.
    server = await start_broken_provider(Flaws.none(), source)
    try:
        results = await run_checks(server.address, records=[BROKEN_ITEM], require_all=True)
    finally:
        await server.stop()
    assert statuses(results) == {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING, **NOT_PREVIEWABLE},
        check: FAIL,
    }, table_text(results)
    assert says in by_name(results)[check].detail, by_name(results)[check].detail


async def test_a_record_source_is_judged_apart_from_its_action_flaws() -> None:
    # Every action flaw (an unstable Discover among them), and a source that keeps the
    # contract: the source checks pass, and source.side_effect_free leaves Discover to
    # discover.stable.
    server = await start_broken_provider(Flaws(), Source())
    try:
        found = by_name(await run_checks(server.address, records=[BROKEN_ITEM], timeout_s=3.0))
    finally:
        await server.stop()
    assert {name: found[name].status for name in SOURCE_CHECKS} == dict.fromkeys(
        SOURCE_CHECKS, PASS
    ), [found[name] for name in SOURCE_CHECKS]
    assert found["discover.stable"].status == FAIL
    assert "(Discover failed or is unstable)" in found["source.side_effect_free"].detail


def test_the_answer_rule_is_the_gateways() -> None:
    def answer(**fields: object) -> provider_pb2.ResolveRecordResponse:
        record = {"tenant": "acme", "type": "thing", "id": "t-1", "version": "7", **fields}
        return provider_pb2.ResolveRecordResponse(record=common_pb2.RecordContext(**record))

    def fields(reply: provider_pb2.ResolveRecordResponse) -> list[str]:
        return [v.field for v in resolved_record_violations(reply, "acme", "thing", "t-1")]

    assert fields(answer(status="ready", attributes={"colour": "blue"})) == []
    assert fields(provider_pb2.ResolveRecordResponse()) == ["record"]
    assert fields(answer(tenant="globex", id="t-2")) == ["record.tenant", "record.id"]
    assert fields(answer(version="")) == ["record.version"]
    assert fields(answer(status="x" * 65)) == ["record.status"]
    too_many = {f"k{i}": "v" for i in range(17)}
    assert fields(answer(attributes=too_many)) == ["record.attributes"]


# -- execution status ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("flaw", "checks", "says"),
    [
        (
            "status_makes_up_keys",
            {"status.unknown_key", "status.tenant_isolation"},
            "a key never sent: answered RUNNING, expected NEVER_RECEIVED",
        ),
        (
            "status_misreports",
            {"status.finished"},
            "FINISHED with [SUCCEEDED, ref poke-0, pokes 0->1], but Execute answered "
            "[SUCCEEDED, ref poke-1, pokes 0->1]",
        ),
        ("status_unstable", {"status.stable"}, "the executed key: FINISHED [SUCCEEDED, ref"),
        (
            "status_ignores_tenant",
            {"status.tenant_isolation"},
            "answered FINISHED [SUCCEEDED, ref poke-1, pokes 0->1]; another tenant's key must "
            "be NEVER_RECEIVED",
        ),
    ],
)
async def test_a_status_breaking_one_rule_fails_that_check(
    flaw: str, checks: set[str], says: str
) -> None:
    server = await start_broken_provider(dataclasses.replace(Flaws.none(), **{flaw: True}))
    try:
        results = await run_checks(server.address, records=[BROKEN_ITEM], require_all=True)
    finally:
        await server.stop()
    expected = {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING, **NOT_PREVIEWABLE},
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
    }
    expected.update(dict.fromkeys(checks, FAIL))
    assert statuses(results) == expected, table_text(results)
    details = " | ".join(by_name(results)[name].detail for name in checks)
    assert says in details, details


async def test_a_provider_without_execution_status_is_not_supported_not_failed(
    tmp_path: Path,
) -> None:
    # The SDK without dedupe and without a status function: UNIMPLEMENTED, with a reason.
    provider = Provider("stateless", version="1.0.0", dedupe=False)

    @provider.action("gadget.touch", record_types=["gadget"], risk=Risk.LOW)
    async def touch(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded(external_ref=f"touch-{ctx.record.id}")

    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path))
    server = await start_provider(provider, config)
    try:
        results = await run_checks(server.address, records=[GADGET], require_all=True)
    finally:
        await server.stop(grace_s=1.0)
    assert statuses(results) == {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING, **NOT_PREVIEWABLE},
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
        **dict.fromkeys(STATUS_CHECKS, SKIP),
    }, table_text(results)
    assert not failed(results)
    for name in STATUS_CHECKS:
        assert by_name(results)[name].detail.startswith("not supported: "), by_name(results)[name]


async def test_an_sdk_provider_passes_the_status_checks_with_its_own_function(
    tmp_path: Path,
) -> None:
    # No dedupe store: the provider's own system answers, here a dict of what it did.
    provider = Provider("ledger", version="1.0.0", dedupe=False)
    done: dict[tuple[str, str, str], Result] = {}

    @provider.action("gadget.touch", record_types=["gadget"], risk=Risk.LOW)
    async def touch(ctx: ActionContext, inputs: NoInputs) -> Result:
        key = (ctx.tenant, ctx.action_id, ctx.idempotency_key)
        if key not in done:
            done[key] = Result.succeeded(external_ref=f"touch-{len(done) + 1}")
        return done[key]

    @provider.execution_status
    async def status(tenant: str, action_id: str, key: str) -> ExecutionStatus | None:
        found = done.get((tenant, action_id, key))
        return None if found is None else ExecutionStatus.finished(found)

    config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path))
    server = await start_provider(provider, config)
    try:
        results = await run_checks(server.address, records=[GADGET], require_all=True)
    finally:
        await server.stop(grace_s=1.0)
    assert statuses(results) == {
        **{**dict.fromkeys(CHECKS, PASS), **NOT_LONG_RUNNING, **NOT_PREVIEWABLE},
        **dict.fromkeys(SOURCE_CHECKS, SKIP),
    }, table_text(results)
    assert "FINISHED [SUCCEEDED, ref touch-1], as Execute answered" in (
        by_name(results)["status.finished"].detail
    )


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
    # workitems and records are the systems of record of their types; escalation sources
    # nothing, so its source checks do not apply (and --require-all accepts that).
    # Only escalation is long-running: the others skip those checks as not applicable.
    # records and escalation preview their actions; every escalation action is
    # previewable, and its execution is ACCEPTED (long-running): nothing to compare yet.
    unsourced = SOURCE_CHECKS if provider == "escalation" else LONG_RUNNING_CHECKS
    not_applicable = {
        "workitems": list(NOT_PREVIEWABLE),
        "records": [],
        "escalation": ["preview.unsupported", "preview.matches_execute"],
    }[provider]
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        **dict.fromkeys(CHECKS, PASS),
        **dict.fromkeys(unsourced, SKIP),
        **dict.fromkeys(not_applicable, SKIP),
    }
