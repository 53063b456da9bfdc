"""Fuzz target: the gateway's token parser and verifier (gateway.auth.TokenVerifier).

Two verifiers are built the way the gateway builds them: development mode (an
HS256 secret file) and production mode (a JSON Web Key Set file with one ES256
key, ``kid`` "k1"). Each fuzz input becomes the ``authorization`` metadata of one
call, in one of five shapes chosen by its first byte: the raw value, ``Bearer``
plus arbitrary text, a token with an arbitrary header and signature around valid
claims, or a token really signed with the secret / the ES256 key whose claims and
header fields come from the input.

A crash is any of: an exception other than ``Unauthenticated`` (the gateway
would answer INTERNAL); a Caller from a token none of our keys signed; a Caller
with an empty or over-long subject or tenant, or roles that are not strings; a
refusal whose message repeats the token. Run ``python fuzz/fuzz_token.py
-runs=100000`` (see README).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
if HAVE_ATHERIS and __name__ == "__main__":
    import atheris

    # Coverage feedback from the token code only (the gateway's and PyJWT's):
    # instrumenting every loaded module takes minutes.
    _instrumented: Any = atheris.instrument_imports(include=["actionmesh", "jwt"])
else:
    _instrumented = contextlib.nullcontext()
with _instrumented:
    import jwt

    from actionmesh.gateway.auth import MAX_CLAIM_LENGTH, Caller, TokenVerifier
    from actionmesh.gateway.config import GatewayConfig
    from actionmesh.rpc.errors import Unauthenticated

ISSUER = "actionmesh-dev"
AUDIENCE = "actionmesh"
SECRET = "fuzzing-secret-" + "s" * 32
KID = "k1"
_SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
# Removed at interpreter exit (best effort: libFuzzer may end the process itself).
_KEYS = tempfile.TemporaryDirectory(prefix="actionmesh-fuzz-keys-")
_KEY_DIR = Path(_KEYS.name)
# The development-mode warning is expected here, once per verifier; keep output clean.
logging.getLogger("actionmesh.gateway.auth").setLevel(logging.ERROR)


def _verifiers() -> tuple[TokenVerifier, TokenVerifier]:
    secret_file = _KEY_DIR / "secret"
    secret_file.write_text(SECRET)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(_SIGNING_KEY.public_key()))
    jwks_file = _KEY_DIR / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**jwk, "kid": KID, "alg": "ES256", "use": "sig"}]}))
    dev = TokenVerifier(
        GatewayConfig(jwt_secret_file=str(secret_file), jwt_dev_mode=True, jwt_issuer=ISSUER)
    )
    production = TokenVerifier(
        GatewayConfig(
            jwt_jwks_file=str(jwks_file),
            jwt_issuer=ISSUER,
            jwt_jwks_refresh_s=0,
            # Tokens naming unknown keys must not turn every input into a file read.
            jwt_jwks_min_reload_interval_s=3600,
        )
    )
    return dev, production


DEV, PRODUCTION = _verifiers()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make_claims(overrides: object) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "alice",
        "tenant": "acme",
        "roles": ["operator"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    if isinstance(overrides, dict):
        claims.update(overrides)
    else:
        claims["sub"] = overrides
    return claims


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def check_caller(caller: Caller) -> None:
    assert isinstance(caller, Caller)
    assert isinstance(caller.subject, str) and 0 < len(caller.subject) <= MAX_CLAIM_LENGTH
    assert isinstance(caller.tenant, str) and 0 < len(caller.tenant) <= MAX_CLAIM_LENGTH
    assert all(isinstance(role, str) for role in caller.roles)


def verify(verifier: TokenVerifier, value: str, *, signed: bool, token: str = "") -> Caller | None:
    """One authenticate call: a Caller only for a token we signed, else Unauthenticated."""
    try:
        caller = verifier.authenticate([("authorization", value)])
    except Unauthenticated as refusal:
        assert refusal.reason.startswith("TOKEN_"), refusal.reason
        if len(token) >= 16:
            assert token not in refusal.message, "a refusal repeats the token"
        return None
    assert signed, "a token no key of ours signed was accepted"
    check_caller(caller)
    return caller


def fuzz_one_input(data: bytes) -> Caller | None:
    """One fuzz input: raises (AssertionError or anything unexpected) on a finding.

    Returns the Caller when the input was a token we signed and it was accepted.
    """
    if not data:
        return None
    mode, rest = data[0] % 5, data[1:]
    text = rest.decode("utf-8", "replace")
    if mode == 0:
        for verifier in (DEV, PRODUCTION):
            verify(verifier, text, signed=False, token=text)
        return None
    if mode == 1:
        for verifier in (DEV, PRODUCTION):
            verify(verifier, "Bearer " + text, signed=False, token=text)
        return None
    if mode == 2:
        # Any header (alg none, HS256 with the public key, jku, kid...), any signature.
        header, _, signature = rest.partition(b".")
        token = f"{_b64(header)}.{_b64(json.dumps(make_claims({})).encode())}.{_b64(signature)}"
        for verifier in (DEV, PRODUCTION):
            verify(verifier, "Bearer " + token, signed=False, token=token)
        return None
    claims_text, _, header_text = text.partition("\x00")
    claims = make_claims(_json(claims_text))
    extra = _json(header_text)
    headers = extra if isinstance(extra, dict) else {"kid": header_text}
    try:
        if mode == 3:
            token = jwt.encode(claims, SECRET, algorithm="HS256", headers=headers)
        else:
            token = jwt.encode(
                claims, _SIGNING_KEY, algorithm="ES256", headers={"kid": KID, **headers}
            )
    except (TypeError, ValueError, RecursionError, jwt.PyJWTError):
        return None  # not encodable: no token to send
    return verify(DEV if mode == 3 else PRODUCTION, "Bearer " + token, signed=True, token=token)


def seeds() -> list[bytes]:
    # Well-formed, but signed with a key the gateway does not have.
    foreign = jwt.encode(make_claims({}), "another-secret-" + "x" * 32, algorithm="HS256")
    return [
        b"\x01" + foreign.encode(),
        b"\x02" + b'{"alg":"none","typ":"JWT"}.',
        b"\x03" + b'{"sub":"bob","roles":["approver"]}\x00{"typ":"JWT"}',
        b"\x04" + b'{"tenant":"globex"}\x00{"kid":"k1"}',
    ]


def main(argv: list[str]) -> None:
    import atheris

    if not any(Path(arg).is_dir() for arg in argv[1:] if not arg.startswith("-")):
        # No corpus given: start from the seeds, in a corpus directory kept between runs.
        corpus = Path(tempfile.gettempdir()) / "actionmesh-fuzz" / "token"
        corpus.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds()):
            (corpus / f"seed-{index}").write_bytes(seed)
        argv = [*argv, str(corpus)]
    atheris.Setup(argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
