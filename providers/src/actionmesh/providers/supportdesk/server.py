"""The support platform's HTTP server: a small REST/JSON API over its own store.

Built on the standard library's ``ThreadingHTTPServer`` on purpose: the platform
stands in for a third-party SaaS, so it shares nothing with actionmesh's gRPC
stack, and a web framework would be a runtime dependency of the project only
for a stand-in. Each request runs in its own thread with its own database
session; the store's unique (tenant, idempotency key) makes concurrent creates
safe. Connections are HTTP/1.0 (one request each) and idle ones time out, so
:meth:`SupportDesk.stop` finishes in-flight requests in bounded time.

Endpoints::

    POST /v1/escalations          201 created | 200 replayed (same Idempotency-Key)
                                  | 400 invalid | 409 key reused for another request
    GET  /v1/escalations/{id}     200 | 404
    GET  /v1/escalations?tenant=T[&idempotency_key=K]   200 {"escalations": [...]} | 400
                                  (with a key: the tenant's escalation under it, or none;
                                  how a caller whose create went unanswered finds out)
    POST /v1/escalations/{id}/acknowledge  {"by": "carol"}   200 (also when it already was)
                                  | 404 | 409 withdrawn | 400 invalid
    POST /v1/escalations/{id}/withdraw     {"reason": "..."} 200 (also when it already was)
                                  | 404 | 409 acknowledged | 400 invalid
    GET  /healthz                 200 {"status": "ok"}

An escalation is ``open`` until the support team acknowledges it (``acknowledged``,
with ``acknowledged_by`` and ``acknowledged_at``) or its requester withdraws it
(``withdrawn``, with ``withdrawn_at`` and ``withdrawn_reason``); either is final.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from actionmesh.providers.supportdesk.api import (
    KEY_PATTERN,
    MAX_BODY_BYTES,
    MAX_KEY_CHARS,
    ApiError,
    check_idempotency_key,
    parse_create,
    parse_json,
)
from actionmesh.providers.supportdesk.config import SupportDeskConfig
from actionmesh.providers.supportdesk.store import (
    Created,
    EscalationStore,
    KeyConflict,
    StateConflict,
)
from actionmesh.rpc.identifiers import TENANT

log = logging.getLogger("actionmesh.providers.supportdesk")

COLLECTION = "/v1/escalations"
# POST {COLLECTION}/{id}/{verb}: the body field each takes, and its longest value.
TRANSITIONS = {"acknowledge": ("by", 256), "withdraw": ("reason", 1000)}


class _Server(ThreadingHTTPServer):
    # Joined at server_close, so a stop lets in-flight requests finish.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self, address: tuple[str, int], store: EscalationStore, connection_timeout_s: float
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.connection_timeout_s = connection_timeout_s
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "supportdesk/1.0"
    # Errors the base class answers itself (malformed request lines, ...) are JSON too.
    error_content_type = "application/json"
    error_message_format = '{"error": {"code": "http_%(code)d", "message": "%(message)s"}}'

    def setup(self) -> None:
        super().setup()
        # Bounds idle and slow clients, so stop() never waits on one forever.
        self.connection.settimeout(cast(_Server, self.server).connection_timeout_s)

    @property
    def store(self) -> EscalationStore:
        return cast(_Server, self.server).store

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # -- plumbing -----------------------------------------------------------

    def _send(
        self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _dispatch(self, handler: Any) -> None:
        try:
            handler()
        except ApiError as error:
            headers = {"Allow": "GET, POST"} if error.status == 405 else None
            self._send(error.status, error.to_json(), headers)
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self._send(500, ApiError(500, "internal", "internal error; see the logs").to_json())

    def _read_body(self) -> bytes:
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise ApiError(411, "length_required", "a Content-Length header is required")
        try:
            length = int(length_header)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
        if length < 0:
            raise ApiError(400, "invalid_request", "Content-Length is negative")
        if length > MAX_BODY_BYTES:
            raise ApiError(
                413, "body_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes"
            )
        return self.rfile.read(length)

    # -- routes -------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_PUT(self) -> None:
        self._dispatch(self._not_allowed)

    def do_PATCH(self) -> None:
        self._dispatch(self._not_allowed)

    def do_DELETE(self) -> None:
        self._dispatch(self._not_allowed)

    def _not_allowed(self) -> None:
        raise ApiError(405, "method_not_allowed", f"{self.command} is not supported here")

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif url.path == COLLECTION:
            self._list(parse_qs(url.query, keep_blank_values=True))
        elif url.path.startswith(COLLECTION + "/") and url.path.count("/") == 3:
            escalation_id = url.path.rsplit("/", 1)[1]
            found = self.store.get(escalation_id)
            if found is None:
                raise ApiError(404, "not_found", f"no escalation {escalation_id!r}")
            self._send(200, found.to_json())
        else:
            raise ApiError(404, "not_found", f"no such resource: {url.path}")

    def _list(self, query: Mapping[str, list[str]]) -> None:
        unknown = sorted(set(query) - {"tenant", "idempotency_key"})
        problems = [(name, "unknown query parameter") for name in unknown]
        tenant = query.get("tenant", [""])[-1]
        if not TENANT.valid(tenant):
            problems.append(("tenant", "is required and must be a tenant id"))
        key = query.get("idempotency_key", [None])[-1]
        if key is not None and not KEY_PATTERN.fullmatch(key):
            # The rule of the Idempotency-Key header: no escalation can be under another.
            problems.append(
                ("idempotency_key", f"must be 1-{MAX_KEY_CHARS} visible ASCII characters")
            )
        if problems:
            raise ApiError(400, "invalid_request", "the query is invalid", problems)
        found = self.store.find(tenant, idempotency_key=key)
        self._send(200, {"escalations": [e.to_json() for e in found]})

    def _post(self) -> None:
        path = urlsplit(self.path).path
        parts = path.removeprefix(COLLECTION + "/").split("/")
        if path.startswith(COLLECTION + "/") and len(parts) == 2 and parts[1] in TRANSITIONS:
            self._transition(parts[0], parts[1])
            return
        if path != COLLECTION:
            if path.startswith(COLLECTION + "/"):
                self._not_allowed()
            raise ApiError(404, "not_found", f"no such resource: {self.path}")
        key = check_idempotency_key(self.headers.get("Idempotency-Key"))
        new, fingerprint = parse_create(self._read_body())
        outcome = self.store.create(new, idempotency_key=key, fingerprint=fingerprint)
        if isinstance(outcome, KeyConflict):
            raise ApiError(
                409,
                "idempotency_key_reused",
                f"the Idempotency-Key was already used for a different request "
                f"(escalation {outcome.existing_id}); nothing was created",
            )
        created = isinstance(outcome, Created)
        escalation = outcome.escalation
        log.info(
            "%s escalation %s for %s %s/%s (key %s)",
            "opened" if created else "replayed",
            escalation.id,
            escalation.tenant,
            escalation.source_type,
            escalation.source_id,
            key,
        )
        self._send(
            201 if created else 200,
            escalation.to_json(),
            {
                "Location": f"{COLLECTION}/{escalation.id}",
                "Idempotent-Replayed": "false" if created else "true",
            },
        )

    def _transition(self, escalation_id: str, verb: str) -> None:
        """acknowledge (by the support team) or withdraw (by the requester)."""
        field, max_len = TRANSITIONS[verb]
        data = parse_json(self._read_body())
        unknown = sorted(set(data) - {field})
        problems = [(name, "unknown field") for name in unknown]
        value = data.get(field)
        if not isinstance(value, str) or not 1 <= len(value.strip()) <= max_len:
            problems.append((field, f"is required: 1-{max_len} characters"))
        if problems:
            raise ApiError(400, "invalid_request", f"the {verb} request is invalid", problems)
        assert isinstance(value, str)
        move = self.store.acknowledge if verb == "acknowledge" else self.store.withdraw
        moved = move(escalation_id, value.strip())
        if moved is None:
            raise ApiError(404, "not_found", f"no escalation {escalation_id!r}")
        if isinstance(moved, StateConflict):
            raise ApiError(
                409,
                "invalid_state",
                f"escalation {escalation_id} is {moved.escalation.status}; it cannot be "
                f"{'acknowledged' if verb == 'acknowledge' else 'withdrawn'} any more",
            )
        log.info("escalation %s %s (%s)", escalation_id, moved.status, value.strip())
        self._send(200, moved.to_json())


class SupportDesk:
    """A running support platform: its bound port and URL, and how to stop it."""

    def __init__(self, config: SupportDeskConfig) -> None:
        self.config = config
        self.store = EscalationStore.open(config.store_url)
        try:
            self._server = _Server(
                (config.host, config.port), self.store, config.connection_timeout_s
            )
        except BaseException:
            self.store.close()
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="supportdesk"
        )
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> SupportDesk:
        self._thread.start()
        log.info("supportdesk listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close the store."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        self.store.close()


def start_supportdesk(config: SupportDeskConfig) -> SupportDesk:
    """Open the store, bind the port (0 picks a free one) and serve in a thread."""
    return SupportDesk(config).start()


def is_healthy(url: str, timeout_s: float = 0.5) -> bool:
    """``GET {url}/healthz`` answers 200 (for supervisors such as ``actionmesh up``)."""
    # No proxies: a supervisor probes a process it started on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url.rstrip("/") + "/healthz", timeout=timeout_s) as reply:
            return bool(reply.status == HTTPStatus.OK)
    except (OSError, urllib.error.URLError):
        return False
