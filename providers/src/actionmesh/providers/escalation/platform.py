"""The support platform's REST API as the escalation provider sees it (httpx, async).

Every way a call can end is one of three answers, decided by whether the
platform may have created something:

- :class:`Opened`: the platform answered 201 (created) or 200 (replay of the
  same Idempotency-Key) with the escalation.
- :class:`NothingCreated` (raised): the request never reached the platform
  (connection refused or timed out, no free connection) or the platform said
  so itself (503/429 "not now", 4xx "not this"). ``retryable`` tells which.
- :class:`OutcomeUnknown` (raised): the request was sent and no usable answer
  came back (read timeout, dropped connection, 5xx other than 503, a body
  without an id). The escalation may exist; only the same Idempotency-Key can
  safely ask again.

:meth:`SupportDeskClient.find_escalation` asks, read-only, which escalation the
platform holds under an Idempotency-Key (``GET /v1/escalations?tenant=&idempotency_key=``):
what settles an outcome that was unknown. It answers the escalation or None, or
raises :class:`LookupFailed` when the platform gave no usable answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from actionmesh.providers.escalation.config import EscalationConfig

CREATE_PATH = "/v1/escalations"
USER_AGENT = "actionmesh-escalation/1.0"
# Answers by which the platform says it did not take the request (HTTP semantics).
NOT_NOW = frozenset({429, 503})
ACKNOWLEDGED, WITHDRAWN = "acknowledged", "withdrawn"


@dataclass(frozen=True)
class Opened:
    """The platform holds an escalation for this key."""

    escalation_id: str
    queue: str
    status: str
    # True when an earlier call with the same Idempotency-Key had opened it.
    replayed: bool


@dataclass(frozen=True)
class Held:
    """An escalation the platform holds under a tenant's Idempotency-Key."""

    escalation_id: str
    queue: str
    status: str
    # When the platform opened it (None when it did not say, or said it unreadably).
    created_at: datetime | None
    # Who of the support team acknowledged it, and when (empty / None: nobody yet).
    acknowledged_by: str = ""
    acknowledged_at: datetime | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status == ACKNOWLEDGED

    @property
    def withdrawn(self) -> bool:
        return self.status == WITHDRAWN


class LookupFailed(Exception):
    """The platform gave no usable answer to a read; asking again later may work."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NothingCreated(Exception):
    """The platform did not create anything; ``retryable`` if trying later may work."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        http_status: int | None = None,
        code: str = "",
        fields: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.http_status = http_status
        self.code = code
        self.fields = tuple(fields)
        self.retry_after_s = retry_after_s


class OutcomeUnknown(Exception):
    """The request was sent; whether the platform created the escalation is unknown."""

    def __init__(self, message: str, *, reason: str = "DOWNSTREAM_OUTCOME_UNKNOWN") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: not worth parsing for a hint


def _error_of(response: httpx.Response) -> tuple[str, str, list[tuple[str, str]]]:
    """(code, message, field problems) of a platform error body, tolerating any body."""
    try:
        error = response.json().get("error", {})
        fields = [
            (str(f.get("field", "")), str(f.get("description", "")))
            for f in error.get("fields", [])
            if isinstance(f, dict)
        ]
        return str(error.get("code", "")), str(error.get("message", "")), fields
    except (ValueError, AttributeError, TypeError):
        return "", response.text[:200], []


class SupportDeskClient:
    """One connection pool to the platform, opened at provider start."""

    def __init__(self, config: EscalationConfig) -> None:
        self.config = config
        self._http = httpx.AsyncClient(
            base_url=config.platform_url.rstrip("/"),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            trust_env=config.trust_env_proxy,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def open_escalation(
        self, payload: Mapping[str, Any], *, idempotency_key: str, timeout_s: float
    ) -> Opened:
        """POST the escalation under ``idempotency_key``; at most ``timeout_s`` in total."""
        timeout = httpx.Timeout(timeout_s, connect=min(self.config.connect_timeout_s, timeout_s))
        try:
            # httpx bounds each phase; this bounds the whole call.
            async with asyncio.timeout(timeout_s):
                response = await self._http.post(
                    CREATE_PATH,
                    json=dict(payload),
                    headers={"Idempotency-Key": idempotency_key},
                    timeout=timeout,
                )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise NothingCreated(
                f"the support platform could not be reached ({type(exc).__name__})",
                retryable=True,
            ) from exc
        except (httpx.TransportError, TimeoutError) as exc:
            raise OutcomeUnknown(
                f"the support platform did not answer after the request was sent "
                f"({type(exc).__name__})"
            ) from exc
        return self._opened(response)

    async def find_escalation(
        self, tenant: str, idempotency_key: str, *, timeout_s: float
    ) -> Held | None:
        """The escalation the platform holds under ``idempotency_key`` for ``tenant``, or
        None; read-only. Raises :class:`LookupFailed` when there is no usable answer."""
        timeout = httpx.Timeout(timeout_s, connect=min(self.config.connect_timeout_s, timeout_s))
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._http.get(
                    CREATE_PATH,
                    params={"tenant": tenant, "idempotency_key": idempotency_key},
                    timeout=timeout,
                )
        except (httpx.TransportError, TimeoutError) as exc:
            raise LookupFailed(
                f"the support platform did not answer ({type(exc).__name__})"
            ) from exc
        if response.status_code == 400:
            code, message, fields = _error_of(response)
            if any(field == "idempotency_key" for field, _ in fields):
                # A key the platform refuses to look up is one it never accepted on
                # create either (the same rule): it holds nothing under it.
                return None
            raise LookupFailed(f"the support platform refused the lookup: {message or code}")
        if response.status_code != 200:
            _, message, _ = _error_of(response)
            raise LookupFailed(
                f"the support platform answered {response.status_code}: {message or 'no details'}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise LookupFailed("the support platform answered a body that is not JSON") from exc
        return _held(body, tenant, idempotency_key)

    async def withdraw_escalation(
        self, escalation_id: str, *, reason: str, timeout_s: float
    ) -> Held | None:
        """Withdraw an open escalation; the escalation as it stands after (``status``
        ``withdrawn``, or ``acknowledged`` when the support team took it on first), or None
        when the platform holds none with that id. Raises :class:`LookupFailed` when the
        platform gave no usable answer (the escalation may still be open)."""
        timeout = httpx.Timeout(timeout_s, connect=min(self.config.connect_timeout_s, timeout_s))
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._http.post(
                    f"{CREATE_PATH}/{escalation_id}/withdraw",
                    json={"reason": reason[:1000] or "withdrawn"},
                    timeout=timeout,
                )
                current = response
                if response.status_code == 409:
                    # Not open any more: read what it became (acknowledged, most likely).
                    current = await self._http.get(
                        f"{CREATE_PATH}/{escalation_id}", timeout=timeout
                    )
        except (httpx.TransportError, TimeoutError) as exc:
            raise LookupFailed(
                f"the support platform did not answer ({type(exc).__name__})"
            ) from exc
        if current.status_code == 404:
            return None
        if current.status_code != 200:
            _, message, _ = _error_of(current)
            raise LookupFailed(
                f"the support platform answered {current.status_code}: {message or 'no details'}"
            )
        try:
            item = current.json()
        except ValueError as exc:
            raise LookupFailed("the support platform answered a body that is not JSON") from exc
        if not isinstance(item, dict):
            raise LookupFailed("the support platform answered a malformed escalation")
        return _held(
            {"escalations": [item]}, str(item.get("tenant")), str(item.get("idempotency_key"))
        )

    @staticmethod
    def _opened(response: httpx.Response) -> Opened:
        status = response.status_code
        if status in (200, 201):
            try:
                body = response.json()
                escalation_id = body["id"]
                if not isinstance(escalation_id, str) or not escalation_id:
                    raise ValueError("no escalation id")
            except (ValueError, KeyError, TypeError) as exc:
                raise OutcomeUnknown(
                    f"the support platform answered {status} without a usable escalation id",
                    reason="DOWNSTREAM_PROTOCOL_ERROR",
                ) from exc
            return Opened(
                escalation_id=escalation_id,
                queue=str(body.get("queue", "")),
                status=str(body.get("status", "")),
                replayed=status == 200,
            )
        code, message, fields = _error_of(response)
        if status in NOT_NOW:
            raise NothingCreated(
                message or f"the support platform is not accepting escalations ({status})",
                retryable=True,
                http_status=status,
                code=code,
                retry_after_s=_retry_after(response.headers.get("Retry-After")),
            )
        if 400 <= status < 500:
            raise NothingCreated(
                message or f"the support platform refused the escalation ({status})",
                retryable=False,
                http_status=status,
                code=code,
                fields=fields,
            )
        raise OutcomeUnknown(f"the support platform answered {status}: {message or 'no details'}")


def _created_at(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _held(body: object, tenant: str, idempotency_key: str) -> Held | None:
    """The escalation of a list answer that is under this tenant's key, if any."""
    if not isinstance(body, dict) or not isinstance(body.get("escalations"), list):
        raise LookupFailed("the support platform answered a list without escalations")
    for item in body["escalations"]:
        if not isinstance(item, dict):
            raise LookupFailed("the support platform answered a malformed escalation")
        # The platform filters by the key; matching again costs nothing and means an
        # answer about another tenant or key is never taken for this one.
        if item.get("tenant") != tenant or item.get("idempotency_key") != idempotency_key:
            continue
        escalation_id = item.get("id")
        if not isinstance(escalation_id, str) or not escalation_id:
            raise LookupFailed("the support platform answered an escalation without an id")
        return Held(
            escalation_id=escalation_id,
            queue=str(item.get("queue", "")),
            status=str(item.get("status", "")),
            created_at=_created_at(item.get("created_at")),
            acknowledged_by=str(item.get("acknowledged_by") or ""),
            acknowledged_at=_created_at(item.get("acknowledged_at")),
        )
    return None
