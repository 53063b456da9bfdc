"""The escalation provider against the support platform running as its own process.

The platform (actionmesh.providers.supportdesk) is started with its real command line and
ready file; faults are real too: the platform process is stopped, or the
provider talks to a socket that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import Mesh, MeshSettings, tail
from actionmesh.providers.escalation import EscalationLog, PlatformNotConfigured, escalation
from actionmesh.providers.escalation.config import ENV_PREFIX
from actionmesh.providers.escalation.provider import ACTION_TIMEOUT_S, call_budget
from actionmesh.providers.supportdesk import Escalation, EscalationStore, is_healthy
from actionmesh.rpc.errors import error_details
from actionmesh.sdk import ProviderConfig, start_provider
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, provider_pb2, provider_pb2_grpc
from tests.conftest import TEST_MESH, bearer, eventually

pytestmark = pytest.mark.timeout(90)

URL_ENV = f"{ENV_PREFIX}_PLATFORM_URL"
ALICE = common_pb2.Operator(subject="alice", tenant="acme", roles=["operator"])
START_TIMEOUT_S = 20.0


class Platform:
    """The support platform as a child process, restartable on the same data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = root / "supportdesk.log"

    def start(self) -> None:
        ready = self.root / "supportdesk.json"
        ready.unlink(missing_ok=True)
        port = self.url.rsplit(":", 1)[1] if self.url else "0"  # a restart keeps its URL
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "actionmesh.providers.supportdesk",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    port,
                    "--data-dir",
                    str(self.root / "data"),
                    "--ready-file",
                    str(ready),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"supportdesk exited:\n{tail(self.log_path)}")
            if ready.exists():
                info = json.loads(ready.read_text())
                assert info["address"] == f"127.0.0.1:{info['port']}"
                self.url = info["url"]
                if is_healthy(self.url):
                    return
            time.sleep(0.05)
        raise AssertionError(f"supportdesk not ready in {START_TIMEOUT_S}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError("supportdesk did not stop on SIGTERM") from None
        assert returncode == 0, tail(self.log_path)

    def escalations(self, tenant: str = "acme") -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/v1/escalations", params={"tenant": tenant}, timeout=5)
        reply.raise_for_status()
        found: list[dict[str, Any]] = reply.json()["escalations"]
        return found


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    running = Platform(tmp_path / "platform")
    running.root.mkdir()
    running.start()
    try:
        yield running
    finally:
        running.stop()


@asynccontextmanager
async def served(
    data_dir: Path, platform_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[provider_pb2_grpc.ActionProviderServiceStub]:
    """The provider in-process with the binary's start-up code, pointed at ``platform_url``."""
    monkeypatch.setenv(URL_ENV, platform_url)
    server = await start_provider(escalation, ProviderConfig(port=0, data_dir=str(data_dir)))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield provider_pb2_grpc.ActionProviderServiceStub(channel)
    finally:
        await server.stop(1.0)


def provider_log(data_dir: Path) -> EscalationLog:
    return EscalationLog.open(ProviderConfig(data_dir=str(data_dir)).database_url_for("escalation"))


def escalate_request(
    key: str,
    *,
    record_id: str = "T-1001",
    record_type: str = "ticket",
    status: str = "open",
    summary: str = "Customer cannot log in since the SSO change",
    severity: str = "high",
    target_queue: str | None = None,
) -> provider_pb2.ExecuteRequest:
    inputs = {
        "summary": common_pb2.InputValue(string_value=summary),
        "severity": common_pb2.InputValue(string_value=severity),
    }
    if target_queue is not None:
        inputs["target_queue"] = common_pb2.InputValue(string_value=target_queue)
    return provider_pb2.ExecuteRequest(
        action_id="case.escalate",
        record=common_pb2.RecordContext(
            tenant="acme", type=record_type, id=record_id, status=status
        ),
        operator=ALICE,
        inputs=inputs,
        idempotency_key=key,
        request_id=f"req-{key}",
    )


# -- the platform on its own ------------------------------------------------------------


async def test_platform_creates_once_per_key_and_validates_strictly(platform: Platform) -> None:
    body = {
        "tenant": "acme",
        "source": {"type": "ticket", "id": "T-7", "status": "open"},
        "summary": "Invoice totals are wrong",
        "severity": "medium",
        "requested_by": "alice",
        "trace": {"trace_id": "ab" * 16, "correlation_id": "req-1"},
    }
    async with httpx.AsyncClient(base_url=platform.url, timeout=5) as http:
        created = await http.post("/v1/escalations", json=body, headers={"Idempotency-Key": "k-1"})
        assert created.status_code == 201, created.text
        escalation_id = created.json()["id"]
        assert created.headers["Location"] == f"/v1/escalations/{escalation_id}"
        assert created.headers["Idempotent-Replayed"] == "false"

        # A retry in another trace is the same request: the same escalation, 200.
        retry = {**body, "trace": {"trace_id": "cd" * 16, "correlation_id": "req-2"}}
        again = await http.post("/v1/escalations", json=retry, headers={"Idempotency-Key": "k-1"})
        assert (again.status_code, again.json()["id"]) == (200, escalation_id)
        assert again.headers["Idempotent-Replayed"] == "true"

        other = {**body, "summary": "Something else entirely"}
        conflict = await http.post(
            "/v1/escalations", json=other, headers={"Idempotency-Key": "k-1"}
        )
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "idempotency_key_reused"

        no_key = await http.post("/v1/escalations", json=body)
        assert no_key.status_code == 400
        assert no_key.json()["error"]["fields"] == [
            {"field": "Idempotency-Key", "description": "is required"}
        ]

        bad = {"tenant": "acme", "source": {"type": "ticket"}, "severity": "urgent", "extra": 1}
        invalid = await http.post("/v1/escalations", json=bad, headers={"Idempotency-Key": "k-2"})
        assert invalid.status_code == 400
        fields = {f["field"] for f in invalid.json()["error"]["fields"]}
        assert fields == {"extra", "source.id", "summary", "severity", "requested_by"}

        not_json = await http.post(
            "/v1/escalations",
            content=b"summary=hi",
            headers={"Idempotency-Key": "k-3", "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert not_json.status_code == 415

        # Concurrent first uses of one key: one creates, the others replay it.
        racing = {**body, "source": {"type": "ticket", "id": "T-8"}}
        replies = await asyncio.gather(
            *(
                http.post("/v1/escalations", json=racing, headers={"Idempotency-Key": "k-race"})
                for _ in range(6)
            )
        )
        assert sorted(r.status_code for r in replies) == [200] * 5 + [201]
        raced_id = replies[0].json()["id"]
        assert {r.json()["id"] for r in replies} == {raced_id}

        fetched = await http.get(f"/v1/escalations/{escalation_id}")
        assert fetched.status_code == 200
        assert fetched.json()["source"] == {"type": "ticket", "id": "T-7", "status": "open"}
        assert (await http.get("/v1/escalations/SD-NOPE")).status_code == 404
        assert (await http.get("/v1/escalations")).status_code == 400  # tenant is required

    # Of all those requests exactly two created something: one per key.
    assert [e["id"] for e in await asyncio.to_thread(platform.escalations)] == [
        escalation_id,
        raced_id,
    ]
    assert await asyncio.to_thread(platform.escalations, "globex") == []


# -- the provider against the platform --------------------------------------------------

RUNNING = provider_pb2.EXECUTION_STATE_RUNNING
FINISHED = provider_pb2.EXECUTION_STATE_FINISHED
WAITING = "waiting for the support team to acknowledge"


async def status_of(
    stub: provider_pb2_grpc.ActionProviderServiceStub, key: str
) -> provider_pb2.GetExecutionStatusResponse:
    reply: provider_pb2.GetExecutionStatusResponse = await stub.GetExecutionStatus(
        status_request(key), timeout=10
    )
    return reply


async def finished(
    stub: provider_pb2_grpc.ActionProviderServiceStub, key: str, timeout_s: float = 20.0
) -> provider_pb2.GetExecutionStatusResponse:
    """The FINISHED status of ``key``, once it is (bounded polling)."""

    async def check() -> provider_pb2.GetExecutionStatusResponse | None:
        reply = await status_of(stub, key)
        return reply if reply.state == FINISHED else None

    done = await eventually(check, timeout_s=timeout_s)
    assert isinstance(done, provider_pb2.GetExecutionStatusResponse)
    return done


async def running_with(
    stub: provider_pb2_grpc.ActionProviderServiceStub, key: str, text: str
) -> provider_pb2.GetExecutionStatusResponse:
    """The RUNNING status of ``key`` once its progress says ``text`` (bounded polling)."""

    async def check() -> provider_pb2.GetExecutionStatusResponse | None:
        reply = await status_of(stub, key)
        return reply if reply.state == RUNNING and text in reply.progress.message else None

    found = await eventually(check, timeout_s=20)
    assert isinstance(found, provider_pb2.GetExecutionStatusResponse)
    return found


async def stored_answer(
    stub: provider_pb2_grpc.ActionProviderServiceStub, request: provider_pb2.ExecuteRequest
) -> provider_pb2.ExecuteResponse:
    """What the SDK stored for the request's key, once the background task ended: a
    same-key Execute answers it (ACCEPTED while the task runs)."""

    async def check() -> provider_pb2.ExecuteResponse | None:
        reply: provider_pb2.ExecuteResponse = await stub.Execute(request, timeout=10)
        return None if reply.outcome == common_pb2.OUTCOME_ACCEPTED else reply

    answer = await eventually(check, timeout_s=20)
    assert isinstance(answer, provider_pb2.ExecuteResponse)
    return answer


def acknowledge(platform: Platform, escalation_id: str, by: str = "carol") -> dict[str, Any]:
    reply = httpx.post(
        f"{platform.url}/v1/escalations/{escalation_id}/acknowledge", json={"by": by}, timeout=5
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def accepted(
    stub: provider_pb2_grpc.ActionProviderServiceStub, request: provider_pb2.ExecuteRequest
) -> provider_pb2.ExecuteResponse:
    reply: provider_pb2.ExecuteResponse = await stub.Execute(request, timeout=15)
    assert reply.outcome == common_pb2.OUTCOME_ACCEPTED, reply
    assert reply.message == "accepted; running"
    return reply


async def test_escalate_is_accepted_waits_for_the_acknowledgement_and_succeeds(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "provider"
    request = escalate_request("key-1", target_queue="identity")
    async with served(data_dir, platform.url, monkeypatch) as stub:
        await accepted(stub, request)
        waiting = await running_with(stub, "key-1", WAITING)
        [held] = await asyncio.to_thread(platform.escalations)
        assert held["id"].startswith("SD-") and held["status"] == "open"
        assert f"ticket {held['id']} opened at the support desk" in waiting.progress.message
        assert waiting.progress.HasField("updated_at")
        # A same-key Execute while it waits: ACCEPTED with the ticket, nothing new opened.
        again = await stub.Execute(request, timeout=15)
        assert (again.outcome, again.external_ref) == (common_pb2.OUTCOME_ACCEPTED, held["id"])

        acked = await asyncio.to_thread(acknowledge, platform, held["id"], "carol")
        assert (acked["status"], acked["acknowledged_by"]) == ("acknowledged", "carol")
        done = await finished(stub, "key-1")
        reply = done.result
        assert await stub.Execute(request, timeout=15) == reply  # the stored final answer

    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED, reply
    assert reply.external_ref == held["id"]
    assert changes_of(reply) == [
        ("escalation", "", held["id"]),
        ("escalation_queue", "", "identity"),
        ("escalation_acknowledged_by", "", "carol"),
        ("escalation_acknowledged_at", "", acked["acknowledged_at"]),
    ]
    assert "acknowledged by carol" in reply.message
    assert {k: held[k] for k in ("tenant", "source", "summary", "severity", "queue")} == {
        "tenant": "acme",
        "source": {"type": "ticket", "id": "T-1001", "status": "open"},
        "summary": "Customer cannot log in since the SSO change",
        "severity": "high",
        "queue": "identity",
    }
    # The operator comes from the verified request, the key from the gateway.
    assert held["requested_by"] == "alice"
    assert held["idempotency_key"] == "key-1"
    assert held["trace"]["correlation_id"] == "req-key-1"
    assert len(await asyncio.to_thread(platform.escalations)) == 1
    log = provider_log(data_dir)
    try:
        [entry] = log.entries()
        assert (entry.state, entry.external_ref, entry.record_id) == (
            "acknowledged",
            held["id"],
            "T-1001",
        )
    finally:
        log.close()


async def test_the_same_key_never_opens_two_escalations(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = escalate_request("key-same")
    async with served(tmp_path / "provider-a", platform.url, monkeypatch) as stub:
        await accepted(stub, request)
        await running_with(stub, "key-same", WAITING)
        [held] = await asyncio.to_thread(platform.escalations)
        await asyncio.to_thread(acknowledge, platform, held["id"])
        first = (await finished(stub, "key-same")).result
        repeat = await stub.Execute(request, timeout=15)  # the SDK's stored result
    assert first.outcome == repeat.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert repeat == first

    # A provider that lost its state (or another replica) sends the key again: the
    # platform's Idempotency-Key handling answers with the same, acknowledged escalation.
    async with served(tmp_path / "provider-b", platform.url, monkeypatch) as stub:
        await accepted(stub, request)
        fresh = await stored_answer(stub, request)
    assert fresh.outcome == common_pb2.OUTCOME_SUCCEEDED, fresh
    assert fresh.external_ref == first.external_ref
    assert [e["id"] for e in await asyncio.to_thread(platform.escalations)] == [first.external_ref]


async def test_a_platform_down_at_first_is_retried_with_the_same_key(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "provider"
    request = escalate_request("key-down")
    await asyncio.to_thread(platform.stop)
    async with served(data_dir, platform.url, monkeypatch) as stub:
        await accepted(stub, request)
        await running_with(stub, "key-down", "support desk not answering; retrying")
        # Back within the retry window: the same key opens it once.
        await asyncio.to_thread(platform.start)
        await running_with(stub, "key-down", WAITING)
        [held] = await asyncio.to_thread(platform.escalations)
        await asyncio.to_thread(acknowledge, platform, held["id"])
        reply = (await finished(stub, "key-down")).result
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED, reply
    assert [e["id"] for e in await asyncio.to_thread(platform.escalations)] == [reply.external_ref]


async def test_a_platform_down_for_good_is_rejected_and_nothing_was_escalated(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}_OPEN_RETRY_S", "0.5")
    await asyncio.to_thread(platform.stop)
    async with served(tmp_path / "provider", platform.url, monkeypatch) as stub:
        await accepted(stub, escalate_request("key-gone"))
        done = await finished(stub, "key-gone")
    assert (done.result.outcome, done.result.reason) == (
        common_pb2.OUTCOME_REJECTED,
        "DOWNSTREAM_UNAVAILABLE",
    )
    assert "nothing was escalated" in done.result.message
    await asyncio.to_thread(platform.start)
    assert await asyncio.to_thread(platform.escalations) == []


async def test_a_refused_request_is_rejected_and_creates_nothing(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served(tmp_path / "provider", platform.url, monkeypatch) as stub:
        # The platform owns queue names; this one breaks its rules.
        await accepted(stub, escalate_request("key-bad-queue", target_queue="Billing Team!"))
        await accepted(stub, escalate_request("key-closed", status="resolved"))
        reply = (await finished(stub, "key-bad-queue")).result
        closed = (await finished(stub, "key-closed")).result
        discovered = await stub.Discover(
            provider_pb2.DiscoverRequest(
                record=common_pb2.RecordContext(
                    tenant="acme", type="workitem", id="wi-1003", status="closed"
                ),
                operator=ALICE,
            ),
            timeout=5,
        )
    assert reply.outcome == common_pb2.OUTCOME_REJECTED, reply
    assert reply.reason == "DOWNSTREAM_REJECTED"
    assert "target_queue" in reply.message
    assert (closed.outcome, closed.reason) == (common_pb2.OUTCOME_REJECTED, "RECORD_CLOSED")
    assert [(a.action_id, a.available, a.unavailable_reason) for a in discovered.actions] == [
        ("case.escalate", False, "RECORD_CLOSED")
    ]
    assert await asyncio.to_thread(platform.escalations) == []


async def test_no_answer_after_sending_is_partial_with_outcome_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}_OPEN_RETRY_S", "0.5")
    monkeypatch.setenv(f"{ENV_PREFIX}_REQUEST_TIMEOUT_S", "0.3")
    # Accepts connections (the kernel completes the handshake) and never answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        data_dir = tmp_path / "provider"
        request = escalate_request("key-silent")
        async with served(data_dir, url, monkeypatch) as stub:
            await accepted(stub, request)
            reply = await stored_answer(stub, request)
    assert reply.outcome == common_pb2.OUTCOME_PARTIAL, reply
    assert reply.reason == "DOWNSTREAM_OUTCOME_UNKNOWN"
    assert "key-silent" in reply.message and "same idempotency key" in reply.message
    assert reply.external_ref == ""
    log = provider_log(data_dir)
    try:
        assert [(e.state, e.idempotency_key) for e in log.entries()] == [
            ("outcome_unknown", "key-silent")
        ]
    finally:
        log.close()


async def test_a_failed_write_back_is_partial_with_the_external_ref(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "provider"
    async with served(data_dir, platform.url, monkeypatch) as stub:
        # The provider's own log breaks after start-up; the platform is fine.
        with sqlite3.connect(data_dir / "escalation.db") as db:
            db.execute("DROP TABLE escalation_log")
        await accepted(stub, escalate_request("key-writeback"))
        reply = (await finished(stub, "key-writeback")).result
    assert reply.outcome == common_pb2.OUTCOME_PARTIAL, reply
    assert reply.reason == "ESCALATION_LOG_FAILED"
    [held] = await asyncio.to_thread(platform.escalations)
    assert reply.external_ref == held["id"]
    assert held["id"] in reply.message


async def test_cancel_withdraws_the_escalation_at_the_platform(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = provider_pb2.StopExecutionRequest(
        tenant="acme",
        action_id="case.escalate",
        idempotency_key="key-cancel",
        request_id="req-key-cancel",
        requested_by="bob",
        reason="the customer found the answer",
    )
    async with served(tmp_path / "provider", platform.url, monkeypatch) as stub:
        await accepted(stub, escalate_request("key-cancel"))
        await running_with(stub, "key-cancel", WAITING)
        assert (await stub.StopExecution(stop, timeout=10)).state in (RUNNING, FINISHED)
        done = await finished(stub, "key-cancel")
        # Idempotent: asking again is too late, and changes nothing.
        assert (await stub.StopExecution(stop, timeout=10)).state == FINISHED
        assert await status_of(stub, "key-cancel") == done
    [held] = await asyncio.to_thread(platform.escalations)
    assert held["status"] == "withdrawn"
    assert held["withdrawn_reason"] == "cancelled at bob's request: the customer found the answer"
    result = done.result
    assert result.outcome == common_pb2.OUTCOME_CANCELLED, result
    assert result.external_ref == held["id"]
    assert changes_of(result) == [("escalation", held["id"], "withdrawn")]
    # Acknowledging a withdrawn escalation is refused by the platform.
    late = await asyncio.to_thread(
        httpx.post,
        f"{platform.url}/v1/escalations/{held['id']}/acknowledge",
        json={"by": "x"},
        timeout=5,
    )
    assert late.status_code == 409


async def test_a_restarted_provider_still_follows_the_escalation(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "provider"
    async with served(data_dir, platform.url, monkeypatch) as stub:
        await accepted(stub, escalate_request("key-restart"))
        await running_with(stub, "key-restart", WAITING)
    # Stopped while it waited: the SDK stored PROVIDER_STOPPED, the escalation stays open.
    [held] = await asyncio.to_thread(platform.escalations)
    assert held["status"] == "open"
    async with served(data_dir, platform.url, monkeypatch) as stub:
        # The platform tells: still open, so still running.
        status = await status_of(stub, "key-restart")
        assert status.state == RUNNING, status
        assert WAITING in status.progress.message
        await asyncio.to_thread(acknowledge, platform, held["id"], "dave")
        done = await status_of(stub, "key-restart")
        assert done.state == FINISHED, done
        assert done.result.outcome == common_pb2.OUTCOME_SUCCEEDED
        assert done.result.external_ref == held["id"]
        assert ("escalation_acknowledged_by", "", "dave") in changes_of(done.result)
        assert await status_of(stub, "key-restart") == done  # stable


def test_the_demo_command_acknowledges_at_the_local_support_desk(
    platform: Platform, tmp_path: Path
) -> None:
    body = {
        "tenant": "acme",
        "source": {"type": "ticket", "id": "T-3"},
        "summary": "Acknowledge me from the CLI",
        "severity": "low",
        "requested_by": "alice",
    }
    created = httpx.post(
        f"{platform.url}/v1/escalations", json=body, headers={"Idempotency-Key": "k-cli"}, timeout=5
    )
    escalation_id = created.json()["id"]
    # What `actionmesh up` writes: the CLI finds the support desk there.
    data_dir = tmp_path / "mesh"
    data_dir.mkdir()
    (data_dir / "mesh.json").write_text(json.dumps({"supportdesk": platform.url}))
    command = [sys.executable, "-m", "actionmesh.cli", "--data-dir", str(data_dir), "demo"]
    done = subprocess.run(
        [*command, "acknowledge", escalation_id, "--by", "erin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert escalation_id in done.stdout and "erin" in done.stdout
    [held] = platform.escalations()
    assert (held["status"], held["acknowledged_by"]) == ("acknowledged", "erin")
    missing = subprocess.run(
        [*command, "acknowledge", "SD-NOPE"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert "SD-NOPE" in missing.stdout + missing.stderr


async def test_the_provider_does_not_start_without_a_platform_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    with pytest.raises(PlatformNotConfigured, match=URL_ENV):
        await start_provider(escalation, ProviderConfig(port=0, data_dir=str(tmp_path)))
    assert not escalation.running


def test_the_platform_call_stays_inside_the_callers_deadline() -> None:
    assert call_budget(None, 8.0) == 8.0
    assert call_budget(ACTION_TIMEOUT_S, 8.0) == 8.0
    assert call_budget(2.0, 8.0) == pytest.approx(1.6)
    assert call_budget(20.0, 8.0) == 8.0
    assert call_budget(-1.0, 8.0) < 0


# -- what became of an escalation (GetExecutionStatus) ------------------------------------


class Relay:
    """A TCP relay in front of the platform, to make it look slow or unreachable for real.

    ``hold_answers``: requests reach the platform, its answers never come back (the
    connection stays open until the client gives up): a platform too slow to answer.
    ``drop_requests``: requests never reach the platform and nothing answers.
    Each connection keeps the mode it was opened in.
    """

    def __init__(self, target_url: str) -> None:
        self.target_port = int(target_url.rsplit(":", 1)[1])
        self.hold_answers = False
        self.drop_requests = False
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hold, drop = self.hold_answers, self.drop_requests
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, swallow: bool
        ) -> None:
            while data := await source.read(65536):
                if not swallow:
                    sink.write(data)
                    await sink.drain()
            if not swallow:
                sink.close()

        # The client's side ends the connection: when it gives up, or got its answer.
        answers = asyncio.ensure_future(pipe(upstream_reader, writer, hold or drop))
        try:
            await pipe(reader, upstream_writer, drop)
            if not drop:
                await asyncio.wait_for(answers, 15)
        except (OSError, TimeoutError):
            pass
        finally:
            answers.cancel()
            for end in (writer, upstream_writer):
                end.close()


def as_preview(request: provider_pb2.ExecuteRequest) -> provider_pb2.PreviewRequest:
    return provider_pb2.PreviewRequest(
        action_id=request.action_id,
        record=request.record,
        operator=request.operator,
        inputs=request.inputs,
    )


async def test_a_preview_says_where_it_goes_and_an_approved_escalation_checks_the_case(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served(tmp_path / "provider", platform.url, monkeypatch) as stub:
        request = escalate_request("key-preview", target_queue="billing", severity="critical")
        preview = await stub.Preview(as_preview(request), timeout=10)
        assert preview.effect == (
            "opens an escalation in queue billing of the support desk for ticket T-1001 "
            "(severity critical), then waits for the support team to acknowledge it"
        )
        assert [(c.field, c.before, c.after) for c in preview.changes] == [
            ("escalation_queue", "", "billing")
        ]
        assert any("critical" in w for w in preview.warnings)
        assert preview.state_digest.startswith("case-")
        # Read-only and stable: the platform got nothing; the same preview again.
        assert await stub.Preview(as_preview(request), timeout=10) == preview
        assert await asyncio.to_thread(platform.escalations) == []
        default = await stub.Preview(as_preview(escalate_request("key-x")), timeout=10)
        assert "queue general" in default.effect
        assert default.state_digest == preview.state_digest  # same case, other inputs

        # A closed case: refused as Execute would refuse it.
        closed = escalate_request("key-closed", status="resolved")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Preview(as_preview(closed), timeout=10)
        details = error_details(caught.value)
        assert (details.code, details.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "RECORD_CLOSED",
        )

        # Approved on the preview, but the case moved on (now pending): REJECTED at once,
        # nothing sent to the platform.
        moved = escalate_request("key-moved", status="pending")
        moved.preview_digest = preview.state_digest
        refused = await stub.Execute(moved, timeout=15)
        assert (refused.outcome, refused.reason) == (
            common_pb2.OUTCOME_REJECTED,
            "STATE_CHANGED_SINCE_PREVIEW",
        )
        assert await asyncio.to_thread(platform.escalations) == []

        # The case as previewed: accepted, and it opens in the previewed queue.
        request.preview_digest = preview.state_digest
        await accepted(stub, request)
        await running_with(stub, "key-preview", WAITING)
        [held] = await asyncio.to_thread(platform.escalations)
        assert held["queue"] == "billing"


def status_request(key: str, tenant: str = "acme") -> provider_pb2.GetExecutionStatusRequest:
    return provider_pb2.GetExecutionStatusRequest(
        tenant=tenant, action_id="case.escalate", idempotency_key=key, request_id=f"req-{key}"
    )


def changes_of(reply: provider_pb2.ExecuteResponse) -> list[tuple[str, str, str]]:
    return [(c.field, c.before, c.after) for c in reply.changes]


async def test_the_status_of_an_answered_escalation_is_its_answer(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served(tmp_path / "provider", platform.url, monkeypatch) as stub:
        unknown = await stub.GetExecutionStatus(status_request("key-status"), timeout=10)
        assert unknown.state == provider_pb2.EXECUTION_STATE_NEVER_RECEIVED
        await accepted(stub, escalate_request("key-status"))
        await running_with(stub, "key-status", WAITING)
        [held] = await asyncio.to_thread(platform.escalations)
        await asyncio.to_thread(acknowledge, platform, held["id"])
        status = await finished(stub, "key-status")
        answer = await stub.Execute(escalate_request("key-status"), timeout=15)
        assert status.result == answer
        # Another tenant asking the same key: never received, like an unknown key.
        other = await stub.GetExecutionStatus(status_request("key-status", "globex"), timeout=10)
        assert other.state == provider_pb2.EXECUTION_STATE_NEVER_RECEIVED

        # The stored answer is final: given without asking the platform, even when it is down.
        await asyncio.to_thread(platform.stop)
        again = await stub.GetExecutionStatus(status_request("key-status"), timeout=10)
        assert again == status


async def test_an_answer_lost_to_a_slow_platform_is_settled_by_the_platform(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}_OPEN_RETRY_S", "0.5")
    monkeypatch.setenv(f"{ENV_PREFIX}_REQUEST_TIMEOUT_S", "0.5")
    request = escalate_request("key-slow")
    async with Relay(platform.url) as relay:
        relay.hold_answers = True
        async with served(tmp_path / "provider", relay.url, monkeypatch) as stub:
            await accepted(stub, request)
            lost = await stored_answer(stub, request)
            # The platform got the request and opened the escalation; its answers came
            # too late, for as long as the provider kept re-sending the key.
            assert (lost.outcome, lost.reason) == (
                common_pb2.OUTCOME_PARTIAL,
                "DOWNSTREAM_OUTCOME_UNKNOWN",
            ), lost
            assert lost.external_ref == ""
            [held] = await asyncio.to_thread(platform.escalations)

            relay.hold_answers = False
            # Settled by the platform: open there, so waiting for the acknowledgement...
            waiting = await status_of(stub, "key-slow")
            assert waiting.state == RUNNING, waiting
            assert held["id"] in waiting.progress.message
            # ... and, once acknowledged, what the handler would have answered.
            await asyncio.to_thread(acknowledge, platform, held["id"])
            status = await status_of(stub, "key-slow")
            assert status.state == FINISHED
            settled = status.result
            assert (settled.outcome, settled.reason) == (common_pb2.OUTCOME_SUCCEEDED, "")
            assert settled.external_ref == held["id"]
            assert changes_of(settled)[:2] == [
                ("escalation", "", held["id"]),
                ("escalation_queue", "", held["queue"]),
            ]
            # Stable, and asking changed nothing: no second escalation, Execute still
            # answers what it answered.
            assert await status_of(stub, "key-slow") == status
            assert await stub.Execute(request, timeout=10) == lost
    assert len(await asyncio.to_thread(platform.escalations)) == 1


async def test_an_answer_lost_before_the_platform_got_it_settles_as_not_created(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}_OPEN_RETRY_S", "0.5")
    monkeypatch.setenv(f"{ENV_PREFIX}_REQUEST_TIMEOUT_S", "0.5")
    data_dir = tmp_path / "provider"
    request = escalate_request("key-dropped")
    async with Relay(platform.url) as relay:
        relay.drop_requests = True
        async with served(data_dir, relay.url, monkeypatch) as stub:
            await accepted(stub, request)
            lost = await stored_answer(stub, request)
            assert lost.reason == "DOWNSTREAM_OUTCOME_UNKNOWN", lost
            relay.drop_requests = False
            # The platform holds nothing yet, and may still be handling the request.
            waiting = await status_of(stub, "key-dropped")
            assert waiting.state == RUNNING
            assert "holds no escalation for this idempotency key yet" in waiting.progress.message
            assert waiting.progress.HasField("updated_at")
        assert await asyncio.to_thread(platform.escalations) == []

        # Past the settle window the platform's "none" is final: nothing was escalated.
        monkeypatch.setenv(f"{ENV_PREFIX}_OUTCOME_SETTLE_S", "0")
        async with served(data_dir, relay.url, monkeypatch) as stub:
            final = await status_of(stub, "key-dropped")
            assert final.state == FINISHED
            assert (final.result.outcome, final.result.reason) == (
                common_pb2.OUTCOME_REJECTED,
                "DOWNSTREAM_NOT_CREATED",
            )
            assert final.result.external_ref == "" and not final.result.changes
            assert await status_of(stub, "key-dropped") == final


async def test_the_platform_tells_a_provider_that_lost_its_state(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served(tmp_path / "provider-a", platform.url, monkeypatch) as stub:
        await accepted(stub, escalate_request("key-a"))
        await running_with(stub, "key-a", WAITING)
        [held] = await asyncio.to_thread(platform.escalations)
        await asyncio.to_thread(acknowledge, platform, held["id"])
        answer = (await finished(stub, "key-a")).result
    # Another replica (or this one after losing its store) holds nothing for the key,
    # but the platform does.
    async with served(tmp_path / "provider-b", platform.url, monkeypatch) as stub:
        status = await status_of(stub, "key-a")
        assert status.state == FINISHED
        assert status.result == answer  # the same answer, built from the platform's state
        other = await stub.GetExecutionStatus(status_request("key-a", "globex"), timeout=10)
        assert other.state == provider_pb2.EXECUTION_STATE_NEVER_RECEIVED
        never = await status_of(stub, "key-never")
        assert never.state == provider_pb2.EXECUTION_STATE_NEVER_RECEIVED

        await asyncio.to_thread(platform.stop)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetExecutionStatus(status_request("key-never"), timeout=15)
        details = error_details(raised.value)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert details.reason == "DOWNSTREAM_UNAVAILABLE" and details.retry_after_s
    await asyncio.to_thread(platform.start)


async def test_the_platform_looks_keys_up_within_the_tenant(platform: Platform) -> None:
    body = {
        "tenant": "acme",
        "source": {"type": "ticket", "id": "T-9"},
        "summary": "Look me up by key",
        "severity": "low",
        "requested_by": "alice",
    }
    async with httpx.AsyncClient(base_url=platform.url, timeout=5) as http:
        created = await http.post("/v1/escalations", json=body, headers={"Idempotency-Key": "k-9"})
        assert created.status_code == 201

        async def lookup(**params: str) -> httpx.Response:
            return await http.get("/v1/escalations", params=params)

        found = await lookup(tenant="acme", idempotency_key="k-9")
        assert [e["id"] for e in found.json()["escalations"]] == [created.json()["id"]]
        assert (await lookup(tenant="globex", idempotency_key="k-9")).json() == {"escalations": []}
        assert (await lookup(tenant="acme", idempotency_key="k-8")).json() == {"escalations": []}
        for bad in ("", "has space", "k" * 256, "k\n"):
            refused = await lookup(tenant="acme", idempotency_key=bad)
            assert refused.status_code == 400, bad
            assert [f["field"] for f in refused.json()["error"]["fields"]] == ["idempotency_key"]


# -- through the real gateway -----------------------------------------------------------


async def test_escalation_through_the_gateway(platform: Platform, tmp_path: Path) -> None:
    """The escalation is long-running through the gateway: ACCEPTED at once, the
    gateway follows it (progress: waiting for the support team), and it SUCCEEDS when the
    support desk acknowledges it; with the platform down it never succeeds."""
    extra = {
        **TEST_MESH["extra_env"],  # type: ignore[dict-item]
        URL_ENV: platform.url,
        # Retry opening for a short while only, so the platform-down case ends soon.
        "ACTIONMESH_ESCALATION_OPEN_RETRY_S": "2",
        "ACTIONMESH_ESCALATION_RETRY_INTERVAL_S": "0.5",
    }
    mesh = Mesh(
        MeshSettings(
            data_dir=tmp_path / "mesh",
            # The records provider is the system of record of tickets: the gateway
            # governs on its facts about the ticket.
            provider_modules=("actionmesh.providers.records", "actionmesh.providers.escalation"),
            **{**TEST_MESH, "extra_env": extra},  # type: ignore[arg-type]
        )
    )
    mesh.start()
    try:
        token = mint_token(mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"])
        ticket = common_pb2.RecordContext(tenant="acme", type="ticket", id="t-100", status="open")
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

            async def offered() -> list[tuple[str, bool]]:
                found = await gateway.DiscoverActions(
                    gateway_pb2.DiscoverActionsRequest(record=ticket, skip_cache=True),
                    metadata=bearer(token),
                    timeout=10,
                )
                return [
                    (a.descriptor.action_id, a.available)
                    for a in found.actions
                    if a.provider_id == "escalation"
                ]

            # The gateway learns of the providers through the registry's watch stream (a
            # medium-risk action is shown once the ticket's source vouches for its facts).
            assert await eventually(offered, timeout_s=15) == [("case.escalate", True)]
            [view] = [
                a
                for a in (
                    await gateway.DiscoverActions(
                        gateway_pb2.DiscoverActionsRequest(record=ticket),
                        metadata=bearer(token),
                        timeout=10,
                    )
                ).actions
                if a.provider_id == "escalation"
            ]
            assert view.descriptor.long_running.cancellable
            assert view.descriptor.long_running.max_duration_s > 0

            def request(key: str) -> gateway_pb2.ExecuteActionRequest:
                return gateway_pb2.ExecuteActionRequest(
                    action_id="case.escalate",
                    record=ticket,
                    inputs={
                        "summary": common_pb2.InputValue(string_value="Refund stuck for 3 days"),
                        "severity": common_pb2.InputValue(string_value="critical"),
                    },
                    idempotency_key=key,
                )

            async def get(execution_id: str) -> gateway_pb2.Execution:
                found = await gateway.GetExecution(
                    gateway_pb2.GetExecutionRequest(execution_id=execution_id),
                    metadata=bearer(token),
                    timeout=10,
                )
                return found.execution

            reply = await gateway.ExecuteAction(
                request(uuid.uuid4().hex), metadata=bearer(token), timeout=20
            )
            execution = reply.execution
            assert execution.outcome == common_pb2.OUTCOME_ACCEPTED, execution

            async def waiting() -> bool:
                found = await get(execution.execution_id)
                return "waiting for the support team" in found.progress.message

            await eventually(waiting, timeout_s=20)
            [held] = await asyncio.to_thread(platform.escalations)
            assert held["requested_by"] == "alice"
            assert held["severity"] == "critical"
            # The gateway's execution id and trace reach the external platform.
            assert held["trace"]["correlation_id"] == execution.execution_id
            assert held["trace"]["trace_id"] == execution.trace_id

            # The support team acknowledges it (`actionmesh demo acknowledge` does this).
            await asyncio.to_thread(acknowledge, platform, held["id"], "carol")

            async def done() -> gateway_pb2.Execution | None:
                found = await get(execution.execution_id)
                return found if found.outcome == common_pb2.OUTCOME_SUCCEEDED else None

            succeeded = await eventually(done, timeout_s=30)
            assert isinstance(succeeded, gateway_pb2.Execution)
            assert succeeded.external_ref == held["id"]
            changed = {c.field: c.after for c in succeeded.changes}
            assert changed.get("escalation_acknowledged_by") == "carol", changed
            assert len(await asyncio.to_thread(platform.escalations)) == 1

            # The platform down: never SUCCEEDED; nothing was created, so it ends REJECTED
            # DOWNSTREAM_UNAVAILABLE once the provider stops retrying.
            await asyncio.to_thread(platform.stop)
            down = await gateway.ExecuteAction(
                request(uuid.uuid4().hex), metadata=bearer(token), timeout=20
            )
            assert down.execution.outcome == common_pb2.OUTCOME_ACCEPTED, down.execution

            async def ended() -> gateway_pb2.Execution | None:
                found = await get(down.execution.execution_id)
                return found if found.outcome != common_pb2.OUTCOME_ACCEPTED else None

            final = await eventually(ended, timeout_s=30)
            assert isinstance(final, gateway_pb2.Execution)
            assert (final.outcome, final.reason) == (
                common_pb2.OUTCOME_REJECTED,
                "DOWNSTREAM_UNAVAILABLE",
            ), final
            assert final.external_ref == ""
    except BaseException:
        for service in mesh.services.values():
            print(f"--- {service.name} log ---\n{tail(service.log_path, 40)}")
        raise
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_a_slow_support_desk_then_answering_ends_in_one_acknowledged_escalation(
    platform: Platform, tmp_path: Path
) -> None:
    """The support desk too slow to answer: the escalation, accepted, keeps re-sending
    with the same Idempotency-Key (progress says so); once the desk answers, it waits
    for the support team, and their acknowledgement makes it SUCCEEDED with the desk's
    ref. The platform holds exactly one escalation."""
    async with Relay(platform.url) as relay:
        extra = {
            **TEST_MESH["extra_env"],  # type: ignore[dict-item]
            URL_ENV: relay.url,
            "ACTIONMESH_GATEWAY_RECONCILE_INTERVAL_S": "0.3",
            "ACTIONMESH_GATEWAY_RECONCILE_MAX_BACKOFF_S": "1",
            "ACTIONMESH_ESCALATION_OPEN_RETRY_S": "30",
            "ACTIONMESH_ESCALATION_RETRY_INTERVAL_S": "0.5",
            "ACTIONMESH_ESCALATION_REQUEST_TIMEOUT_S": "1",
        }
        mesh = Mesh(
            MeshSettings(
                data_dir=tmp_path / "mesh",
                provider_modules=(
                    "actionmesh.providers.records",
                    "actionmesh.providers.escalation",
                ),
                **{**TEST_MESH, "extra_env": extra},  # type: ignore[arg-type]
            )
        )
        mesh.start()
        try:
            token = mint_token(
                mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"]
            )
            ticket = common_pb2.RecordContext(
                tenant="acme", type="ticket", id="t-101", status="open"
            )
            async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
                gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

                async def offered() -> bool:
                    found = await gateway.DiscoverActions(
                        gateway_pb2.DiscoverActionsRequest(record=ticket, skip_cache=True),
                        metadata=bearer(token),
                        timeout=10,
                    )
                    return any(
                        a.descriptor.action_id == "case.escalate" and a.available
                        for a in found.actions
                    )

                async def get(execution_id: str) -> gateway_pb2.Execution:
                    found = await gateway.GetExecution(
                        gateway_pb2.GetExecutionRequest(execution_id=execution_id),
                        metadata=bearer(token),
                        timeout=10,
                    )
                    return found.execution

                await eventually(offered, timeout_s=15)
                relay.hold_answers = True
                reply = await gateway.ExecuteAction(
                    gateway_pb2.ExecuteActionRequest(
                        action_id="case.escalate",
                        record=ticket,
                        inputs={
                            "summary": common_pb2.InputValue(string_value="Refund stuck"),
                            "severity": common_pb2.InputValue(string_value="critical"),
                        },
                        idempotency_key=uuid.uuid4().hex,
                    ),
                    metadata=bearer(token),
                    timeout=20,
                )
                accepted = reply.execution
                assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED, accepted

                async def says(text: str) -> bool:
                    return text in (await get(accepted.execution_id)).progress.message

                await eventually(lambda: says("not answering"), timeout_s=20)
                # The request reached the desk; only its answers were held.
                [held] = await eventually(
                    lambda: asyncio.to_thread(platform.escalations), timeout_s=10
                )
                relay.hold_answers = False
                await eventually(lambda: says("waiting for the support team"), timeout_s=20)
                await asyncio.to_thread(acknowledge, platform, held["id"], "carol")

                async def done() -> gateway_pb2.Execution | None:
                    found = await get(accepted.execution_id)
                    return found if found.outcome != common_pb2.OUTCOME_ACCEPTED else None

                final = await eventually(done, timeout_s=30)
                assert isinstance(final, gateway_pb2.Execution)
                assert final.outcome == common_pb2.OUTCOME_SUCCEEDED, final
                assert final.external_ref == held["id"]
                assert len(await asyncio.to_thread(platform.escalations)) == 1
        except BaseException:
            for service in mesh.services.values():
                print(f"--- {service.name} log ---\n{tail(service.log_path, 40)}")
            raise
        finally:
            await asyncio.to_thread(mesh.stop)


async def test_the_platform_acknowledges_and_withdraws_once(platform: Platform) -> None:
    body = {
        "tenant": "acme",
        "source": {"type": "ticket", "id": "T-4"},
        "summary": "Acknowledge or withdraw me",
        "severity": "low",
        "requested_by": "alice",
    }
    async with httpx.AsyncClient(base_url=platform.url, timeout=5) as http:

        async def create(key: str) -> str:
            created = await http.post(
                "/v1/escalations", json=body, headers={"Idempotency-Key": key}
            )
            assert created.status_code == 201, created.text
            escalation_id: str = created.json()["id"]
            assert created.json()["acknowledged_by"] is None
            return escalation_id

        first = await create("k-ack")
        acked = await http.post(f"/v1/escalations/{first}/acknowledge", json={"by": "carol"})
        assert acked.status_code == 200
        assert (acked.json()["status"], acked.json()["acknowledged_by"]) == (
            "acknowledged",
            "carol",
        )
        assert acked.json()["acknowledged_at"]
        # Idempotent: the same state again, the first acknowledgement kept.
        again = await http.post(f"/v1/escalations/{first}/acknowledge", json={"by": "dave"})
        assert (again.status_code, again.json()["acknowledged_by"]) == (200, "carol")
        late = await http.post(f"/v1/escalations/{first}/withdraw", json={"reason": "late"})
        assert (late.status_code, late.json()["error"]["code"]) == (409, "invalid_state")

        second = await create("k-withdraw")
        withdrawn = await http.post(f"/v1/escalations/{second}/withdraw", json={"reason": "oops"})
        assert withdrawn.status_code == 200
        assert (withdrawn.json()["status"], withdrawn.json()["withdrawn_reason"]) == (
            "withdrawn",
            "oops",
        )
        assert (
            await http.post(f"/v1/escalations/{second}/withdraw", json={"reason": "x"})
        ).status_code == 200
        refused = await http.post(f"/v1/escalations/{second}/acknowledge", json={"by": "carol"})
        assert refused.status_code == 409

        bad = await http.post(f"/v1/escalations/{first}/acknowledge", json={"who": "x"})
        assert bad.status_code == 400
        assert {f["field"] for f in bad.json()["error"]["fields"]} == {"who", "by"}
        missing = await http.post("/v1/escalations/SD-NOPE/acknowledge", json={"by": "carol"})
        assert missing.status_code == 404


def test_an_older_platform_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE escalations (id VARCHAR(32) PRIMARY KEY, tenant VARCHAR(128), "
            "idempotency_key VARCHAR(255), fingerprint VARCHAR(64), status VARCHAR(16), "
            "source_type VARCHAR(64), source_id VARCHAR(128), source_status VARCHAR(64), "
            "summary TEXT, severity VARCHAR(16), queue VARCHAR(64), requested_by VARCHAR(256), "
            "trace_id VARCHAR(32), correlation_id VARCHAR(128), created_at DATETIME)"
        )
        db.execute(
            "INSERT INTO escalations VALUES ('SD-OLD', 'acme', 'k', 'f', 'open', 'ticket', "
            "'T-1', '', 'old one', 'low', 'general', 'alice', '', '', '2026-01-01 00:00:00')"
        )
    store = EscalationStore.open(f"sqlite:///{path}")
    try:
        acknowledged = store.acknowledge("SD-OLD", "carol")
        assert isinstance(acknowledged, Escalation)
        assert (acknowledged.status, acknowledged.acknowledged_by) == ("acknowledged", "carol")
    finally:
        store.close()
