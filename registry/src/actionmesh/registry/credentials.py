"""Who is registering: the credential identity a provider id is bound to.

Derived per call, in this order:

1. a client certificate the server verified (mutual TLS): ``cert:<URI SAN>``, or
   ``cert:cn=<common name>`` when the certificate has no URI SAN. Keyed on the
   workload name, not the certificate, so a renewed certificate keeps ownership.
2. ``authorization: Bearer <token>`` metadata: ``token:<sha256 hex of the token>``.
   The token is an opaque shared secret between one provider and the registry (no
   signature, no expiry): whoever presents it first owns the ids it registers.
   Only its hash is ever stored or logged.
3. nothing: :data:`registry.model.ANONYMOUS`, shared by every anonymous caller,
   unless the registry requires a credential.

A certificate outranks a token: a workload with both is known by its certificate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from actionmesh.registry.model import ANONYMOUS
from actionmesh.rpc.bearer import MalformedAuthorization, bearer_tokens
from actionmesh.rpc.errors import Unauthenticated

MIN_TOKEN_CHARS = 16
"""Shorter tokens are guessable, and a guessed token is a stolen provider id."""
MAX_TOKEN_CHARS = 4096
MAX_NAME_CHARS = 200
"""A longer certificate name is stored as its hash, to fit the owner column."""

REASON_MISSING = "REGISTRATION_CREDENTIAL_REQUIRED"
REASON_INVALID = "REGISTRATION_CREDENTIAL_INVALID"


class CallContext(Protocol):
    """The part of ``grpc.aio.ServicerContext`` this module reads."""

    def peer_identities(self) -> Iterable[bytes] | None: ...

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...

    def invocation_metadata(self) -> Sequence[Any] | None: ...


def registrant(context: CallContext, *, required: bool) -> str:
    """The identity the caller of ``context`` registers as; Unauthenticated if unusable."""
    identity = certificate_identity(context)
    if identity is not None:
        return identity
    token = bearer_token(context.invocation_metadata() or ())
    if token is not None:
        return token_identity(token)
    if required:
        raise Unauthenticated(
            "this registry requires a registration credential: a client certificate "
            "(mutual TLS) or 'authorization: Bearer <token>' metadata "
            "(ACTIONMESH_PROVIDER_REGISTRATION_TOKEN_FILE)",
            reason=REASON_MISSING,
        )
    return ANONYMOUS


def certificate_identity(context: CallContext) -> str | None:
    """``cert:...`` when the peer presented a certificate the server verified."""
    # None unless the transport authenticated the peer; an insecure channel or TLS
    # without client authentication never gets here with a name.
    if context.peer_identities() is None:
        return None
    properties = context.auth_context()
    sans = sorted(_texts(properties.get("x509_subject_alternative_name", ())))
    uris = [san for san in sans if "://" in san]
    if uris:
        return _bounded(f"cert:{uris[0]}")
    names = sorted(_texts(properties.get("x509_common_name", ())))
    if names:
        return _bounded(f"cert:cn={names[0]}")
    return None


def token_identity(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[Any]) -> str | None:
    """The bearer token of the call, None without one; Unauthenticated when malformed."""
    try:
        found = list(bearer_tokens(metadata))
    except MalformedAuthorization as exc:
        raise Unauthenticated(str(exc), reason=REASON_INVALID) from None
    if not found:
        return None
    if len(found) > 1:
        raise Unauthenticated("send one authorization header, not several", reason=REASON_INVALID)
    token = found[0]
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise Unauthenticated(
            f"a registration token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters "
            "(generate one with: python -c 'import secrets; print(secrets.token_hex(32))')",
            reason=REASON_INVALID,
        )
    return token


def _texts(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in values]


def _bounded(identity: str) -> str:
    if len(identity) <= MAX_NAME_CHARS:
        return identity
    return "cert-sha256:" + hashlib.sha256(identity.encode()).hexdigest()
