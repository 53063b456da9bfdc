"""Caller authentication: a JWT from the `authorization` metadata becomes a Caller.

Where the keys come from (exactly one, see GatewayConfig):

- a JSON Web Key Set, from a file (``jwt_jwks_file``) or a URL (``jwt_jwks_url``):
  the production setting. A token must name its key with ``kid``, also when the
  set holds a single key, so that publishing a second key during a rotation can
  never change which tokens are accepted. The set is parsed once per distinct
  content and kept in memory; a token naming an unknown ``kid`` re-reads it (at
  most once per ``jwt_jwks_min_reload_interval_s``), and a background task
  re-reads it every ``jwt_jwks_refresh_s`` so removed keys stop working. A set
  that cannot be read or holds no usable key never replaces the last good one.
- one PEM public key (``jwt_public_key_file``): no ``kid`` needed, no rotation.
- an HS256 shared secret (``jwt_secret_file``), only in development mode.

The accepted algorithms come from configuration only. A token's ``alg`` must be
one of them *and* the one its key is bound to (a JWK's ``alg``, or the family of
its ``kty``/curve), so ``alg: none`` and HS256 tokens "signed" with a public key
are refused; ``jku``/``x5u``/``jwk`` headers are ignored (keys never come from the
token). Required claims: ``exp``, ``iat``, ``iss``, ``aud``, ``sub`` (``nbf`` is
checked when present); ``tenant`` and ``roles`` become the Caller.

Every refusal is UNAUTHENTICATED with an ErrorInfo reason, and its message names
the failed check, never the token or any of its values:

- TOKEN_MISSING: no ``authorization`` metadata.
- TOKEN_MALFORMED: ``authorization`` is not ``Bearer <token>``.
- TOKEN_EXPIRED: ``exp`` passed (beyond the leeway): get a new token.
- TOKEN_NOT_YET_VALID: ``nbf``/``iat`` in the future beyond the leeway (clock skew).
- TOKEN_KEY_UNKNOWN: the ``kid`` is not in the key set, even after a re-read
  (a key not published yet, or retired).
- TOKEN_INVALID: anything else (not a JWT, algorithm refused, no ``kid`` with a
  JWKS, bad signature or tampered claims, wrong issuer or audience, a required
  claim missing, unusable subject/tenant/roles).

The gateway never forwards the token: providers get the verified Caller in the
request's ``operator`` field, and calls to them carry no caller metadata.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from opentelemetry import trace

from actionmesh.gateway.config import GatewayConfig
from actionmesh.rpc.bearer import MalformedAuthorization, bearer_tokens
from actionmesh.rpc.errors import Unauthenticated
from actionmesh.v1 import common_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")

# A backend service's own token, sent next to the operator's (see Caller.service).
SERVICE_METADATA = "actionmesh-service-authorization"
# The auth-context property holding a verified client certificate's URI SANs.
PEER_URI = "peer_uri"
# Claims end up in audit columns of bounded width.
MAX_CLAIM_LENGTH = 128
# Roles feed every policy evaluation and are copied into audit events and approvals:
# a signed but huge list must not cost each request (or each stored event) that much.
MAX_ROLES = 64
MAX_ROLE_LENGTH = 128
# Every token must carry these; nbf is verified when present.
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
DEV_ALGORITHM = "HS256"
# PyJWT warns below this for HS256, and a shorter secret is guessable offline.
MIN_SECRET_BYTES = 32
# Fetching a JWKS URL may happen on the request path (unknown kid): keep it short.
JWKS_FETCH_TIMEOUT_S = 3.0
MAX_KID_LENGTH = 256
# JWK members that only a private key has: such a set was published by mistake.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

Metadata = Iterable[tuple[str, str | bytes]] | None


class TokenKeyError(ValueError):
    """The keys that verify caller tokens cannot be loaded (a start-up error)."""


@dataclass(frozen=True)
class Caller:
    """The verified operator behind a call."""

    subject: str
    tenant: str
    roles: tuple[str, ...]
    service: str = ""
    """The backend service the call came through, authenticated by its own credential:
    the client id of its token in ``actionmesh-service-authorization``, or else (when the
    gateway requires client certificates) the URI SAN of its verified client certificate,
    e.g. ``actionmesh://backend``; empty without either. The operator is still the person
    acting, "on behalf of" whom the service calls."""

    def operator(self) -> common_pb2.Operator:
        """The operator as providers are told it (Discover, Preview, Execute)."""
        return common_pb2.Operator(subject=self.subject, tenant=self.tenant, roles=self.roles)


@dataclass(frozen=True)
class VerificationKey:
    """A key and the algorithms a token verified with it may use."""

    key: Any
    algorithms: tuple[str, ...]


class StaticKey:
    """One key loaded at start: a PEM public key, or the development HS256 secret."""

    def __init__(self, key: VerificationKey, description: str) -> None:
        self._key = key
        self.description = description

    def select(self, header: Mapping[str, Any]) -> VerificationKey:
        return self._key

    @classmethod
    def from_pem(cls, path: str, accepted: Sequence[str]) -> StaticKey:
        try:
            public_key = load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise TokenKeyError(
                f"jwt_public_key_file {path}: not a PEM public key ({exc})"
            ) from exc
        family = key_algorithms(public_key)
        algorithms = tuple(a for a in accepted if a in family)
        if not algorithms:
            raise TokenKeyError(
                f"jwt_public_key_file {path}: a {type(public_key).__name__} key can sign "
                f"{', '.join(family) or 'nothing'}, but jwt_algorithms allows only "
                f"{', '.join(accepted)}"
            )
        return cls(VerificationKey(public_key, algorithms), f"public key {path}")

    @classmethod
    def from_secret(cls, path: str) -> StaticKey:
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            raise TokenKeyError(f"jwt_secret_file {path}: {exc.strerror or exc}") from exc
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise TokenKeyError(
                f"jwt_secret_file {path}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes"
            )
        return cls(VerificationKey(secret, (DEV_ALGORITHM,)), f"development HS256 secret {path}")


def key_algorithms(public_key: object) -> tuple[str, ...]:
    """The algorithms a PEM public key can verify (its family, and for EC its curve)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHM_BY_CURVE.get(public_key.curve.name)
        return (algorithm,) if algorithm else ()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ("EdDSA",)
    return ()


class JwksKeys:
    """The signing keys of a JWKS (file or URL), by ``kid``; re-read on rotation.

    ``select`` runs on the request path and only reads the in-memory snapshot,
    except for an unknown ``kid`` when the last read is older than
    ``min_reload_interval_s``. ``reload`` swaps the snapshot atomically and keeps
    the previous one when the new content is unreadable or has no usable key.
    """

    def __init__(
        self,
        fetch: Callable[[], object],
        description: str,
        accepted: Sequence[str],
        min_reload_interval_s: float,
    ) -> None:
        self._fetch = fetch
        self.description = description
        self._accepted = tuple(accepted)
        self._min_reload_interval_s = min_reload_interval_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._digest = ""
        self._last_read = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str, accepted: Sequence[str], min_interval_s: float) -> JwksKeys:
        def read() -> object:
            return json.loads(Path(path).read_bytes())

        return cls(read, f"JWKS file {path}", accepted, min_interval_s)

    @classmethod
    def from_url(cls, url: str, accepted: Sequence[str], min_interval_s: float) -> JwksKeys:
        # PyJWKClient only fetches here (no redirects, JSON object check); the snapshot
        # below is the cache, so an identity provider outage keeps the last good set.
        client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=JWKS_FETCH_TIMEOUT_S)
        return cls(client.fetch_data, f"JWKS URL {url}", accepted, min_interval_s)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def load(self) -> None:
        """The first read: failures are start-up errors."""
        try:
            self._install(self._fetch(), strict=True)
        except TokenKeyError:
            raise
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise TokenKeyError(f"{self.description}: cannot read it ({exc})") from exc
        finally:
            self._last_read = time.monotonic()

    def reload(self, why: str, *, wait: bool = True, only_if_due: bool = False) -> bool:
        """Read the set again; True when a new set was installed. Never raises.

        With ``wait=False`` it returns False at once while another re-read runs
        (the event loop must not block on a fetch in a worker thread).
        ``only_if_due`` skips it when another re-read finished within the minimum
        interval meanwhile (many calls with the same new kid cause one read).
        """
        if not self._lock.acquire(blocking=wait):
            return False
        if only_if_due and not self.may_reload():
            self._lock.release()
            return False
        try:
            data = self._fetch()
            return self._install(data, strict=False, why=why)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            log.error(
                "%s: re-read (%s) failed, keeping key ids %s: %s",
                self.description,
                why,
                self.key_ids,
                exc,
            )
            return False
        finally:
            # Failures count too: an unreachable identity provider is not hammered.
            self._last_read = time.monotonic()
            self._lock.release()

    def select(self, header: Mapping[str, Any]) -> VerificationKey:
        kid = header_kid(header)
        key = self._keys.get(kid)
        if key is None and self.may_reload():
            self.reload("unknown kid", wait=False, only_if_due=True)
            key = self._keys.get(kid)
        return self._bound(key)

    async def select_async(self, header: Mapping[str, Any]) -> VerificationKey:
        kid = header_kid(header)
        key = self._keys.get(kid)
        if key is None and self.may_reload():
            await asyncio.to_thread(self.reload, "unknown kid", only_if_due=True)
            key = self._keys.get(kid)
        return self._bound(key)

    def may_reload(self) -> bool:
        return time.monotonic() - self._last_read >= self._min_reload_interval_s

    @staticmethod
    def _bound(key: jwt.PyJWK | None) -> VerificationKey:
        if key is None:
            raise Unauthenticated(
                "token is signed with a key this gateway does not know",
                reason="TOKEN_KEY_UNKNOWN",
            )
        # A PyJWK is bound to one algorithm; PyJWT refuses a token whose alg differs.
        return VerificationKey(key, (key.algorithm_name,))

    def _install(self, data: object, *, strict: bool, why: str = "start") -> bool:
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        if digest == self._digest:
            return False
        keys = self._usable_keys(data)
        if not keys:
            message = f"{self.description}: no usable signing key for {', '.join(self._accepted)}"
            if strict:
                raise TokenKeyError(message)
            log.error("%s; keeping %s", message, self.key_ids)
            return False
        self._keys, self._digest = keys, digest
        log.info("%s: loaded (%s) key ids %s", self.description, why, sorted(keys))
        return True

    def _usable_keys(self, data: object) -> dict[str, jwt.PyJWK]:
        raw_keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(raw_keys, list):
            raise ValueError("not a JSON Web Key Set (no 'keys' list)")
        keys: dict[str, jwt.PyJWK] = {}
        for raw in raw_keys:
            kid = raw.get("kid") if isinstance(raw, dict) else None
            problem = self._unusable(raw, kid)
            if problem is None:
                try:
                    key = jwt.PyJWK(raw)
                    # Checks the key against its algorithm (an EC curve ES256 cannot use).
                    key.Algorithm.prepare_key(key.key)
                except jwt.PyJWTError as exc:
                    problem = f"cannot be used ({exc})"
                else:
                    if key.algorithm_name not in self._accepted:
                        problem = f"is for {key.algorithm_name}, not in jwt_algorithms"
                    elif kid in keys:
                        problem = "repeats a kid (the first one is used)"
                    else:
                        keys[str(kid)] = key
            if problem is not None:
                log.warning("%s: key %r %s; skipped", self.description, kid, problem)
        return keys

    @staticmethod
    def _unusable(raw: object, kid: object) -> str | None:
        if not isinstance(raw, dict):
            return "is not a JSON object"
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
            return "has no usable kid (tokens must name their key)"
        if raw.get("use") not in (None, "sig"):
            return "is not a signature key (use)"
        if PRIVATE_JWK_MEMBERS & raw.keys():
            return "holds private or symmetric key material; publish public keys only"
        return None


KeySource = StaticKey | JwksKeys


def header_kid(header: Mapping[str, Any]) -> str:
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
        raise Unauthenticated(
            "token header names no signing key (kid); this gateway needs one",
            reason="TOKEN_INVALID",
        )
    return kid


def key_source(config: GatewayConfig) -> KeySource:
    """The configured key source, loaded (raises TokenKeyError when it cannot be)."""
    accepted = config.jwt_algorithm_list
    interval = config.jwt_jwks_min_reload_interval_s
    if config.jwt_jwks_file or config.jwt_jwks_url:
        keys = (
            JwksKeys.from_file(config.jwt_jwks_file, accepted, interval)
            if config.jwt_jwks_file
            else JwksKeys.from_url(config.jwt_jwks_url, accepted, interval)
        )
        keys.load()
        return keys
    if config.jwt_public_key_file:
        return StaticKey.from_pem(config.jwt_public_key_file, accepted)
    # GatewayConfig already refused a secret without development mode.
    log.warning(
        "development mode: HS256 tokens signed with %s are accepted; never run this in "
        "production (whoever reads the secret can mint any identity)",
        config.jwt_secret_file,
    )
    return StaticKey.from_secret(config.jwt_secret_file)


class TokenVerifier:
    """Verifies caller tokens against the configured keys, issuer and audience."""

    def __init__(self, config: GatewayConfig) -> None:
        self._source = key_source(config)
        self._accepted = (
            (DEV_ALGORITHM,) if config.jwt_secret_file else tuple(config.jwt_algorithm_list)
        )
        self._issuer = config.jwt_issuer
        self._audience = config.jwt_audience
        self._leeway = config.jwt_leeway_s
        self._refresh_s = config.jwt_jwks_refresh_s
        # Only a certificate the TLS handshake verified against tls_ca_file names a peer.
        self._certificates_name_services = config.tls_require_client_cert
        log.info(
            "caller tokens: %s, algorithms %s, issuer %r, audience %r",
            self._source.description,
            ", ".join(self._accepted),
            self._issuer,
            self._audience,
        )

    @property
    def source(self) -> KeySource:
        return self._source

    def authenticate(self, metadata: Metadata) -> Caller:
        """The verified caller; also names the tenant on the call's span (the RPC's own).

        With a JWKS URL, a token naming an unknown ``kid`` may fetch the set here
        (rate-limited, bounded by JWKS_FETCH_TIMEOUT_S); prefer
        :meth:`authenticate_async` from coroutines.
        """
        call_span = trace.get_current_span()
        with tracer.start_as_current_span("auth.authenticate") as span:
            try:
                token, header = self._token_and_header(metadata)
                caller = self._decode(token, self._source.select(header))
            except Unauthenticated as exc:
                span.set_attribute("actionmesh.auth.refused", exc.reason)
                raise
            span.set_attribute("actionmesh.tenant", caller.tenant)
        call_span.set_attribute("actionmesh.tenant", caller.tenant)
        return caller

    async def authenticate_async(
        self, metadata: Metadata, auth_context: Mapping[str, Sequence[bytes]] | None = None
    ) -> Caller:
        """As :meth:`authenticate`, but a JWKS re-read runs off the event loop, and the
        calling service (:attr:`Caller.service`) is named from its service token or, with
        client certificates required, from the call's ``auth_context``."""
        call_span = trace.get_current_span()
        with tracer.start_as_current_span("auth.authenticate") as span:
            try:
                token, header = self._token_and_header(metadata)
                if isinstance(self._source, JwksKeys):
                    key = await self._source.select_async(header)
                else:
                    key = self._source.select(header)
                caller = self._decode(token, key)
                service = await self._service(metadata, caller)
                if not service and self._certificates_name_services and auth_context:
                    service = certificate_identity(auth_context)
            except Unauthenticated as exc:
                span.set_attribute("actionmesh.auth.refused", exc.reason)
                raise
            span.set_attribute("actionmesh.tenant", caller.tenant)
        call_span.set_attribute("actionmesh.tenant", caller.tenant)
        return replace(caller, service=service) if service else caller

    async def _service(self, metadata: Metadata, caller: Caller) -> str:
        """The calling service's client id from its own token, if it sent one."""
        values = [v for k, v in metadata or () if k == SERVICE_METADATA]
        if not values:
            return ""
        if len(values) > 1:
            raise Unauthenticated(
                f"more than one {SERVICE_METADATA} metadata", reason="SERVICE_TOKEN_INVALID"
            )
        raw = values[0]
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                f"{SERVICE_METADATA} is not `Bearer <token>`", reason="SERVICE_TOKEN_INVALID"
            )
        try:
            header = jwt.get_unverified_header(token.strip())
            if header.get("alg") not in self._accepted:
                raise Unauthenticated(
                    "service token algorithm is not accepted", reason="SERVICE_TOKEN_INVALID"
                )
            if isinstance(self._source, JwksKeys):
                key = await self._source.select_async(header)
            else:
                key = self._source.select(header)
            claims = jwt.decode(
                token.strip(),
                key.key,
                algorithms=list(key.algorithms),
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except Unauthenticated as exc:
            raise Unauthenticated(exc.message, reason="SERVICE_TOKEN_INVALID") from None
        except jwt.PyJWTError as exc:
            refused = refusal(exc)
            raise Unauthenticated(
                f"service token: {refused.message}", reason="SERVICE_TOKEN_INVALID"
            ) from None
        client_id = claims.get("client_id") or claims.get("sub")
        if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLAIM_LENGTH:
            raise Unauthenticated(
                "service token names no client id", reason="SERVICE_TOKEN_INVALID"
            )
        tenant = claims.get("tenant")
        if tenant is not None and tenant != caller.tenant:
            # A service token bound to one tenant never vouches in another.
            raise Unauthenticated(
                "service token is for another tenant", reason="SERVICE_TOKEN_INVALID"
            )
        return client_id

    @property
    def refresh_interval_s(self) -> float | None:
        """How often the JWKS is re-read (jwt_jwks_refresh_s); None for a static key."""
        if not isinstance(self._source, JwksKeys) or self._refresh_s <= 0:
            return None
        return self._refresh_s

    async def refresh_keys(self) -> None:
        """Re-read the JWKS once (a scheduled refresh; nothing for a static key)."""
        if isinstance(self._source, JwksKeys):
            await asyncio.to_thread(self._source.reload, "scheduled")

    def _token_and_header(self, metadata: Metadata) -> tuple[str, dict[str, Any]]:
        token = bearer_token(metadata)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("token is not a well-formed JWT", reason="TOKEN_INVALID") from exc
        # Checked before any key lookup: a refused algorithm never causes a JWKS re-read.
        if header.get("alg") not in self._accepted:
            raise Unauthenticated(
                "token algorithm is not accepted (this gateway accepts "
                f"{', '.join(self._accepted)})",
                reason="TOKEN_INVALID",
            )
        return token, header

    def _decode(self, token: str, key: VerificationKey) -> Caller:
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(key.algorithms),
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise refusal(exc) from exc
        return caller_from_claims(claims)


def refusal(exc: jwt.PyJWTError) -> Unauthenticated:
    """The client-facing refusal for a PyJWT error; fixed texts, never token values."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return Unauthenticated("token expired", reason="TOKEN_EXPIRED")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthenticated(
            "token is not valid yet (nbf or iat is in the future beyond the allowed clock skew)",
            reason="TOKEN_NOT_YET_VALID",
        )
    if isinstance(exc, jwt.MissingRequiredClaimError):
        # exc.claim is one of REQUIRED_CLAIMS, not a value from the token.
        return Unauthenticated(
            f"token lacks the required {exc.claim!r} claim", reason="TOKEN_INVALID"
        )
    messages: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.InvalidAudienceError, "token audience is not accepted by this gateway"),
        (jwt.InvalidIssuerError, "token issuer is not trusted by this gateway"),
        (jwt.InvalidAlgorithmError, "token algorithm does not match its signing key"),
        (jwt.InvalidSignatureError, "token signature does not verify"),
        (jwt.InvalidIssuedAtError, "token iat claim is not a timestamp"),
        (jwt.DecodeError, "token is not a well-formed JWT"),
    ]
    for kind, message in messages:
        if isinstance(exc, kind):
            return Unauthenticated(message, reason="TOKEN_INVALID")
    return Unauthenticated(f"token rejected ({type(exc).__name__})", reason="TOKEN_INVALID")


def certificate_identity(auth_context: Mapping[str, Sequence[bytes]]) -> str:
    """The workload identity of a verified client certificate: its one URI SAN (the
    development PKI issues ``actionmesh://<name>``; a SPIFFE id works the same way).
    A certificate with no URI SAN, or several, names nobody."""
    uris = auth_context.get(PEER_URI) or ()
    if len(uris) != 1:
        return ""
    identity = uris[0].decode("utf-8", "replace")
    return identity if 0 < len(identity) <= MAX_CLAIM_LENGTH else ""


def bearer_token(metadata: Metadata) -> str:
    try:
        token = next(bearer_tokens(metadata), None)
    except MalformedAuthorization as exc:
        raise Unauthenticated(str(exc), reason="TOKEN_MALFORMED") from None
    if token is None:
        raise Unauthenticated("missing authorization metadata", reason="TOKEN_MISSING")
    return token


def caller_from_claims(claims: dict[str, object]) -> Caller:
    subject, tenant, roles = claims.get("sub"), claims.get("tenant"), claims.get("roles", [])
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token has no subject", reason="TOKEN_INVALID")
    if len(subject) > MAX_CLAIM_LENGTH:
        raise Unauthenticated("token subject is too long", reason="TOKEN_INVALID")
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_CLAIM_LENGTH:
        raise Unauthenticated("token has no usable tenant claim", reason="TOKEN_INVALID")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("token roles claim must be a list of strings", reason="TOKEN_INVALID")
    if len(roles) > MAX_ROLES:
        raise Unauthenticated(
            f"token roles claim lists more than {MAX_ROLES} roles", reason="TOKEN_INVALID"
        )
    if any(len(role) > MAX_ROLE_LENGTH for role in roles):
        raise Unauthenticated(
            f"token roles claim has a role longer than {MAX_ROLE_LENGTH} characters",
            reason="TOKEN_INVALID",
        )
    return Caller(subject=subject, tenant=tenant, roles=tuple(roles))


def mint_service_token(
    secret: str,
    *,
    client_id: str,
    issuer: str = "actionmesh-dev",
    audience: str = "actionmesh",
    ttl_s: float = 3600.0,
) -> str:
    """Mint an HS256 development token for a backend service (no tenant, no roles):
    sent in ``actionmesh-service-authorization`` next to an operator's token."""
    issued = time.time()
    claims = {
        "sub": client_id,
        "client_id": client_id,
        "iss": issuer,
        "aud": audience,
        "iat": int(issued),
        "nbf": int(issued),
        "exp": int(issued + ttl_s),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


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
    extra: Mapping[str, object] | None = None,
) -> str:
    """Mint an HS256 development token (``actionmesh token`` and tests)."""
    issued = time.time() if now is None else now
    claims: dict[str, object] = {
        **(extra or {}),
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
