"""Signing and checking actionmesh's webhook notifications (a receiver's side).

The gateway delivers each notification as a CloudEvents 1.0 structured JSON body
(``Content-Type: application/cloudevents+json``) with three headers, following the
Standard Webhooks scheme:

``webhook-id``
    The CloudEvents ``id`` (the audit event's id): the same on every retry of the same
    event, so a receiver deduplicates on it.
``webhook-timestamp``
    When this attempt was signed, in whole seconds since the Unix epoch.
``webhook-signature``
    ``v1,<base64 of HMAC-SHA256(secret, "{webhook-id}.{webhook-timestamp}.{body}")>``
    (several space-separated signatures may appear while a secret rotates; one valid
    one is enough).

The documented check, :func:`verify_webhook`: recompute the HMAC over the raw body
with the subscription's secret and compare in constant time (a tampered body, id or
timestamp fails); refuse a timestamp more than ``tolerance_s`` (5 minutes) away from
now (an old delivery replayed later fails); and remember the ids already accepted
(:class:`WebhookReceiver`), so a delivery replayed within the window, or a retry of
one that was processed, is recognised as a duplicate.

A secret is the text of the subscription's secret file with surrounding whitespace
removed (write a random string, e.g. ``openssl rand -hex 32``); a binary key goes in as
``whsec_<base64>`` (the Standard Webhooks form) and is the decoded bytes. Read it with
:func:`secret_bytes` on both sides. Only the standard library is used, so any Python
receiver can copy or import this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
CONTENT_TYPE = "application/cloudevents+json"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0
"""How far a delivery's timestamp may be from the receiver's clock (either way)."""
SECRET_PREFIX = "whsec_"


class WebhookVerificationError(ValueError):
    """A delivery that must be refused; ``reason`` says why, in one word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def secret_bytes(text: str | bytes) -> bytes:
    """A subscription secret as HMAC key bytes (``whsec_<base64>`` is decoded)."""
    raw = text.encode() if isinstance(text, str) else text
    raw = raw.strip()
    if raw.startswith(SECRET_PREFIX.encode()):
        try:
            return base64.b64decode(raw[len(SECRET_PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from exc
    return raw


def signature(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def sign_headers(
    secret: bytes, webhook_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The headers the gateway sends with ``body`` (signed now unless ``timestamp``)."""
    at = int(time.time()) if timestamp is None else timestamp
    return {
        ID_HEADER: webhook_id,
        TIMESTAMP_HEADER: str(at),
        SIGNATURE_HEADER: signature(secret, webhook_id, at, body),
        "content-type": CONTENT_TYPE,
    }


@dataclass(frozen=True)
class VerifiedEvent:
    """A delivery whose signature and timestamp checked out."""

    webhook_id: str
    timestamp: int
    event: dict[str, Any]
    """The CloudEvent, parsed (``type``, ``id``, ``data``, ...)."""


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise WebhookVerificationError("missing_header", f"the {name} header is missing")


def verify_webhook(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> VerifiedEvent:
    """Check one delivery (signature over id, timestamp and raw body; timestamp within
    ``tolerance_s`` of ``now``); the parsed event, or WebhookVerificationError.

    It does not remember ids: use :class:`WebhookReceiver` (or your own store of
    ids seen) to recognise a replay within the window and retries of one delivery.
    """
    webhook_id = _header(headers, ID_HEADER)
    stamp = _header(headers, TIMESTAMP_HEADER)
    signatures = _header(headers, SIGNATURE_HEADER)
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise WebhookVerificationError("bad_timestamp", f"timestamp {stamp!r}") from exc
    expected = signature(secret, webhook_id, timestamp, body)
    # Constant-time comparison against every signature offered.
    if not any(
        hmac.compare_digest(expected.encode(), offered.encode()) for offered in signatures.split()
    ):
        raise WebhookVerificationError("bad_signature", "no valid signature")
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            "stale_timestamp",
            f"timestamp {timestamp} is more than {tolerance_s:g}s from now ({clock:.0f})",
        )
    try:
        event = json.loads(body)
    except ValueError as exc:
        raise WebhookVerificationError("bad_body", "the body is not JSON") from exc
    if not isinstance(event, dict) or event.get("id") != webhook_id:
        raise WebhookVerificationError("bad_body", "the CloudEvent id is not webhook-id")
    return VerifiedEvent(webhook_id=webhook_id, timestamp=timestamp, event=event)


class WebhookReceiver:
    """:func:`verify_webhook` plus memory of the ids accepted (bounded, thread-safe).

    :meth:`receive` returns the event the first time an id arrives and None for a
    duplicate (a gateway retry of a delivery already processed, or a replay): answer
    2xx either way, so the gateway stops retrying. Ids are remembered for longer than
    the timestamp window by default, so a replay is refused by one check or the other.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        remember: int = 100_000,
    ) -> None:
        self._secret = secret
        self._tolerance_s = tolerance_s
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def receive(
        self, headers: Mapping[str, str], body: bytes, *, now: float | None = None
    ) -> VerifiedEvent | None:
        verified = verify_webhook(
            self._secret, headers, body, tolerance_s=self._tolerance_s, now=now
        )
        with self._lock:
            if verified.webhook_id in self._seen:
                return None
            self._seen[verified.webhook_id] = None
            while len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        return verified
