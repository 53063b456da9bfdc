"""Caller authentication: a JWT from the `authorization` metadata becomes a Caller.

PyJWT verifies signature, issuer, audience, expiry (with a bounded leeway); the
claims give subject, tenant and roles. Anything missing or wrong is
UNAUTHENTICATED with a reason; the token itself is never echoed or forwarded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from opentelemetry import trace

from actionmesh.rpc.errors import Unauthenticated
from gateway.config import GatewayConfig

# Claims end up in audit columns of bounded width.
MAX_CLAIM_LENGTH = 128
HMAC_ALGORITHMS = ["HS256"]
tracer = trace.get_tracer("actionmesh.gateway")
ASYMMETRIC_ALGORITHMS = ["RS256", "ES256"]


@dataclass(frozen=True)
class Caller:
    """The verified operator behind a call."""

    subject: str
    tenant: str
    roles: tuple[str, ...]


class TokenVerifier:
    """Verifies caller tokens with one key loaded at start."""

    def __init__(self, config: GatewayConfig) -> None:
        if config.jwt_public_key_file:
            self._key: str | bytes = Path(config.jwt_public_key_file).read_bytes()
            self._algorithms = ASYMMETRIC_ALGORITHMS
        else:
            self._key = Path(config.jwt_secret_file).read_text().strip()
            self._algorithms = HMAC_ALGORITHMS
        self._issuer = config.jwt_issuer
        self._audience = config.jwt_audience
        self._leeway = config.jwt_leeway_s

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The verified caller; also names the tenant on the call's span (the RPC's own)."""
        call_span = trace.get_current_span()
        with tracer.start_as_current_span("auth.authenticate") as span:
            caller = self._verify(metadata)
            span.set_attribute("actionmesh.tenant", caller.tenant)
        call_span.set_attribute("actionmesh.tenant", caller.tenant)
        return caller

    def _verify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        token = bearer_token(metadata)
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(
                f"token rejected: {type(exc).__name__}", reason="TOKEN_INVALID"
            ) from exc
        return caller_from_claims(claims)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "authorization metadata must be 'Bearer <token>'", reason="TOKEN_MALFORMED"
            )
        return token.strip()
    raise Unauthenticated("missing authorization metadata", reason="TOKEN_MISSING")


def caller_from_claims(claims: dict[str, object]) -> Caller:
    subject, tenant, roles = claims.get("sub"), claims.get("tenant"), claims.get("roles", [])
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token has no subject", reason="TOKEN_INVALID")
    if not isinstance(subject, str) or len(subject) > MAX_CLAIM_LENGTH:
        raise Unauthenticated("token subject is too long", reason="TOKEN_INVALID")
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_CLAIM_LENGTH:
        raise Unauthenticated("token has no usable tenant claim", reason="TOKEN_INVALID")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("token roles claim must be a list of strings", reason="TOKEN_INVALID")
    return Caller(subject=subject, tenant=tenant, roles=tuple(roles))


def mint_token(
    secret: str,
    *,
    subject: str,
    tenant: str,
    roles: Sequence[str],
    issuer: str = "actionmesh-dev",
    audience: str = "actionmesh",
    ttl_s: float = 3600.0,
    now: float | None = None,
) -> str:
    """Mint an HS256 development token (``actionmesh token`` and tests)."""
    issued = time.time() if now is None else now
    claims = {
        "sub": subject,
        "tenant": tenant,
        "roles": list(roles),
        "iss": issuer,
        "aud": audience,
        "iat": int(issued),
        "nbf": int(issued),
        "exp": int(issued + ttl_s),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm="HS256")
