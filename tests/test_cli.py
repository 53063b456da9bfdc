"""The newcomer path: the `actionmesh` command against a running mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from actionmesh.mesh import Mesh


def cli(
    mesh: Mesh, *args: str, token: str | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    if token:
        env["ACTIONMESH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "actionmesh.cli", "--data-dir", str(mesh.data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_token_discover_run_history_with_json(mesh: Mesh) -> None:
    minted = cli(mesh, "token", "--subject", "carol", "--tenant", "globex", "--roles", "operator")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()

    actions = cli(mesh, "actions", "workitem/wi-2001", "--status", "failed", "--json", token=token)
    assert actions.returncode == 0, actions.stdout + actions.stderr
    discovered = json.loads(actions.stdout)
    assert discovered["facts"]["source"] == "FACT_SOURCE_PROVIDER"
    views = discovered["actions"]
    # Every field is present, false booleans and empty strings too.
    offered = {
        v["descriptor"]["action_id"]: (v["available"], v["unavailable_reason"]) for v in views
    }
    assert offered["workitem.retry"] == (True, "")
    # The item's source says it is a customer update, whatever the CLI claims.
    assert offered["workitem.reprocess_email"] == (False, "NOT_INBOUND_EMAIL")

    key = uuid.uuid4().hex
    run = cli(
        mesh,
        "run",
        "workitem.retry",
        "workitem/wi-2001",
        "--status",
        "failed",
        "--input",
        "reason=retry from the cli",
        "--input",
        "priority=high",
        "--idempotency-key",
        key,
        "--json",
        token=token,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    execution = json.loads(run.stdout)
    assert execution["outcome"] == "OUTCOME_SUCCEEDED"
    assert execution["actor"] == "carol" and execution["idempotency_key"] == key
    assert (execution["facts"]["source"], execution["facts"]["vouched_by"]) == (
        "FACT_SOURCE_PROVIDER",
        "workitems",
    )
    shown = cli(mesh, "execution", execution["execution_id"], token=token)
    assert "vouched by: system of record workitems, version" in shown.stdout, shown.stdout

    # The audit outbox ships asynchronously: poll (bounded) until both events landed.
    deadline = time.monotonic() + 15
    events: list[dict[str, Any]] = []
    while len(events) < 2 and time.monotonic() < deadline:
        history = cli(mesh, "history", "workitem/wi-2001", "--json", token=token)
        assert history.returncode == 0, history.stderr
        events = [
            e
            for e in json.loads(history.stdout)
            if e.get("execution_id") == execution["execution_id"]
        ]
    assert len(events) == 2, events
    assert {e["inputs"]["priority"] for e in events} == {"high"}

    assert {e["facts"]["vouched_by"] for e in events} == {"workitems"}
    table = cli(mesh, "history", "workitem/wi-2001", token=token, columns=300)
    assert "carol" in table.stdout and "SUCCEEDED" in table.stdout
    assert "facts from" in table.stdout and "workitems@" in table.stdout


def test_cli_reports_errors_without_a_traceback(mesh: Mesh) -> None:
    no_token = cli(mesh, "actions", "workitem/wi-1001", "--status", "failed")
    assert no_token.returncode == 1
    assert "no token" in no_token.stdout and "Traceback" not in no_token.stdout + no_token.stderr

    token = cli(mesh, "token", "--subject", "alice", "--tenant", "acme").stdout.strip()
    bad = cli(
        mesh,
        "run",
        "workitem.retry",
        "workitem/wi-1001",
        "--status",
        "failed",
        "--input",
        "reason=ok",
        "--input",
        "colour=red",
        token=token,
    )
    assert bad.returncode == 2
    assert "INVALID_ARGUMENT" in bad.stdout and "inputs.colour" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


def test_four_eyes_from_the_command_line(mesh: Mesh) -> None:
    def mint(subject: str, roles: str) -> str:
        return cli(
            mesh, "token", "--subject", subject, "--tenant", "acme", "--roles", roles
        ).stdout.strip()

    alice, sam = mint("alice", "operator"), mint("sam", "supervisor")
    bob = mint("bob", "approver")
    asked = cli(
        mesh,
        "run",
        "ticket.change_service_level",
        "ticket/t-100",
        "--status",
        "open",
        "--input",
        "level=critical",
        "--input",
        "reason=customer outage",
        "--json",
        token=alice,
    )
    assert asked.returncode == 3, asked.stdout + asked.stderr  # not SUCCEEDED (yet)
    held = json.loads(asked.stdout)
    assert held["outcome"] == "OUTCOME_PENDING_APPROVAL"
    execution_id = held["execution_id"]

    listed = cli(mesh, "approvals", "--json", token=sam)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    [mine] = [
        a for a in json.loads(listed.stdout) if a["execution"]["execution_id"] == execution_id
    ]
    assert mine["inputs"]["level"] == {"string_value": "critical"}
    assert execution_id in cli(mesh, "approvals", token=sam).stdout

    own = cli(mesh, "approve", execution_id, "ticket/t-100", "--status", "open", token=alice)
    assert own.returncode == 2 and "SELF_APPROVAL_FORBIDDEN" in own.stdout

    # A critical service level needs two approvers, one a supervisor (the shipped policy).
    counted = cli(mesh, "approve", execution_id, "--comment", "seen it", token=bob)
    assert counted.returncode == 3, counted.stdout + counted.stderr  # still pending
    assert "PENDING_APPROVAL" in counted.stdout
    assert "1 of 2, incl. supervisor (bob)" in counted.stdout, counted.stdout

    approved = cli(
        mesh,
        "approve",
        execution_id,
        "ticket/t-100",
        "--status",
        "open",
        "--comment",
        "outage confirmed",
        token=sam,
    )
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert (
        "SUCCEEDED" in approved.stdout and "approved by sam (outage confirmed)" in approved.stdout
    )
    shown = cli(mesh, "execution", execution_id, token=alice)
    assert "approved by sam" in shown.stdout and "service_level" in shown.stdout

    policy = cli(mesh, "policy", token=sam)
    assert policy.returncode == 0 and "supervisors-approve" in policy.stdout
