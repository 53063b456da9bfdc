"""``python -m actionmesh.webhook_receiver``: a local receiver of the gateway's webhooks.

What ``actionmesh up`` starts for the demo tenant's subscription, and a reference for
writing one: every POST is checked with :class:`actionmesh.client.webhooks.WebhookReceiver`
(HMAC signature over id, timestamp and body; timestamp within the tolerance; ids
already seen are duplicates). A verified notification is logged and appended to
``events_file`` (one JSON line each); a duplicate is answered 200 and not recorded
again; a delivery that fails the check is answered 400 and logged with the reason.

Endpoints::

    POST /<any path>   200 {"status": "received" | "duplicate"} | 400 {"error": reason}
    GET  /events       200 {"events": [CloudEvent, ...]}  (the verified ones, oldest first)
    GET  /healthz      200 {"status": "ok"}

Built on the standard library's ``ThreadingHTTPServer``, like the stand-in support
platform: it stands in for the receiver a tenant runs.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from actionmesh.client.webhooks import (
    DEFAULT_TOLERANCE_S,
    WebhookReceiver,
    WebhookVerificationError,
    secret_bytes,
)
from actionmesh.rpc.config import load_config
from actionmesh.rpc.server import configure_logging, write_ready_file

log = logging.getLogger("actionmesh.webhook_receiver")
ENV_PREFIX = "ACTIONMESH_WEBHOOK_RECEIVER"
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class WebhookReceiverConfig:
    """Settings of the local webhook receiver (flags, or ACTIONMESH_WEBHOOK_RECEIVER_*)."""

    secret_file: str = ""
    """The subscription's secret (the same file the gateway's subscription names)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8790
    """Port to listen on; 0 picks a free port (written to the ready file)."""
    events_file: str = ""
    """Append each verified notification here as one JSON line; empty: keep in memory."""
    tolerance_s: float = DEFAULT_TOLERANCE_S
    """How far a delivery's webhook-timestamp may be from this clock (replay window)."""
    ready_file: str | None = None
    """Write {"pid", "port", "address", "url"} as JSON here once listening."""

    def __post_init__(self) -> None:
        if not self.secret_file:
            raise ValueError("secret_file is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.tolerance_s <= 0:
            raise ValueError("tolerance_s must be positive")


@dataclass
class Received:
    """What a running receiver got, for its owner (tests, the demo)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    """Verified CloudEvents, once each, in arrival order."""
    duplicates: list[str] = field(default_factory=list)
    """Ids delivered again (retries, replays) and not processed twice."""
    refused: list[str] = field(default_factory=list)
    """Reasons of deliveries that failed the check."""
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    """Every POST as it came (headers, raw body), verified or not."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], receiver: WebhookReceiver, events_file: str
    ) -> None:
        self.receiver = receiver
        self.events_file = events_file
        self.received = Received()
        self.lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/events":
            with self.server.lock:
                events = list(self.server.received.events)
            self._reply(HTTPStatus.OK, {"events": events})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not_found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "too_large"})
            return
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        received = self.server.received
        with self.server.lock:
            received.deliveries.append((headers, body))
        try:
            verified = self.server.receiver.receive(headers, body)
        except WebhookVerificationError as exc:
            log.warning("refused a delivery (%s): %s", exc.reason, exc)
            with self.server.lock:
                received.refused.append(exc.reason)
            self._reply(HTTPStatus.BAD_REQUEST, {"error": exc.reason})
            return
        if verified is None:
            with self.server.lock:
                received.duplicates.append(headers.get("webhook-id", ""))
            self._reply(HTTPStatus.OK, {"status": "duplicate"})
            return
        event = verified.event
        data = event.get("data") or {}
        log.info(
            "notification %s id=%s execution=%s action=%s outcome=%s",
            event.get("type"),
            event.get("id"),
            data.get("execution_id"),
            data.get("action_id"),
            data.get("outcome"),
        )
        with self.server.lock:
            received.events.append(event)
            if self.server.events_file:
                with Path(self.server.events_file).open("a") as out:
                    out.write(json.dumps(event) + "\n")
        self._reply(HTTPStatus.OK, {"status": "received"})


class RunningReceiver:
    """A receiver serving in a background thread."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="webhook-receiver", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def received(self) -> Received:
        return self._server.received

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_receiver(
    secret: bytes,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    events_file: str = "",
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> RunningReceiver:
    """Serve on ``host:port`` (0: a free port) until :meth:`RunningReceiver.stop`."""
    receiver = WebhookReceiver(secret, tolerance_s=tolerance_s)
    return RunningReceiver(_Server((host, port), receiver, events_file))


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    config = load_config(
        WebhookReceiverConfig,
        env_prefix=ENV_PREFIX,
        argv=argv,
        description="A local receiver of actionmesh webhook notifications (checks signatures).",
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    running = start_receiver(
        secret_bytes(Path(config.secret_file).read_bytes()),
        host=config.host,
        port=config.port,
        events_file=config.events_file,
        tolerance_s=config.tolerance_s,
    )
    try:
        write_ready_file(
            config.ready_file,
            name="webhook-receiver",
            port=running.port,
            address=running.address,
            url=running.url,
        )
        log.info("webhook receiver listening on %s", running.url)
        while not stop.wait(0.5):
            pass
    finally:
        running.stop()


if __name__ == "__main__":
    main()
