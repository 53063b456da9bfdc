"""Caller tokens: RS256/ES256 from a JWKS (file or URL), rotation, algorithm confusion.

The matrix runs against ``TokenVerifier`` (what the gateway calls for every RPC);
a gateway process in JWKS mode then shows the same over gRPC, including rotation
without a restart; a probe provider proves the caller's token never leaves the
gateway while the verified identity does.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from actionmesh.gateway.auth import (
    SERVICE_METADATA,
    Caller,
    JwksKeys,
    TokenKeyError,
    TokenVerifier,
)
from actionmesh.gateway.config import GatewayConfig
from actionmesh.mesh import Mesh
from actionmesh.rpc.errors import Unauthenticated, error_details
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, eventually, service_token, vouching_channel

pytestmark = pytest.mark.timeout(120)

ISSUER = "https://idp.example.test/"
AUDIENCE = "actionmesh"
Stub = gateway_pb2_grpc.ActionGatewayServiceStub


# -- keys and tokens -----------------------------------------------------------------
@dataclass(frozen=True)
class SigningKey:
    """A private key as an identity provider holds it, with its kid and algorithm."""

    kid: str
    alg: str
    private: Any

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def jwk(self) -> dict[str, Any]:
        codec = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        public: dict[str, Any] = codec.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        headers = {"kid": self.kid, **header}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "rsa": rsa_key("rsa-2026-01"),
        "ec": ec_key("ec-2026-01"),
        "rsa2": rsa_key("rsa-2026-02"),
        # Never published: signs the "wrong key" tokens.
        "rogue": rsa_key("rsa-2026-01"),
    }


def claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "alice",
        "tenant": "acme",
        "roles": ["operator"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    values.update(override)
    return {k: v for k, v in values.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], body: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"


def alg_none(kid: str) -> str:
    return unsigned({"alg": "none", "typ": "JWT", "kid": kid}, claims(roles=["supervisor"])) + "."


def hs256_with(secret: bytes, kid: str) -> str:
    """The classic confusion attack: HMAC "signed" with the verifier's public key."""
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, claims())
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def tampered(token: str, **change: Any) -> str:
    header, body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(change)
    return f"{header}.{b64(json.dumps(payload).encode())}.{signature}"


def write_jwks(path: Path, *signing: SigningKey, extra: tuple[dict[str, Any], ...] = ()) -> None:
    # Replaced atomically, as a Kubernetes Secret volume or a deploy tool does.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [k.jwk() for k in signing] + list(extra)}))
    os.replace(tmp, path)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refusal(verifier: TokenVerifier, metadata: list[tuple[str, str]]) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as refused:
        verifier.authenticate(metadata)
    return refused.value


def jwks_config(path: Path, **settings: Any) -> GatewayConfig:
    values: dict[str, Any] = dict(
        jwt_jwks_file=str(path),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_jwks_min_reload_interval_s=0.0,
    )
    values.update(settings)
    return GatewayConfig(**values)


@pytest.fixture
def jwks_file(tmp_path: Path, keys: dict[str, SigningKey]) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, keys["rsa"], keys["ec"])
    return path


@pytest.fixture
def verifier(jwks_file: Path) -> TokenVerifier:
    return TokenVerifier(jwks_config(jwks_file))


# -- the matrix, at the verifier -------------------------------------------------------
def test_valid_rs256_and_es256_tokens_give_the_verified_caller(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    for signer in (keys["rsa"], keys["ec"]):
        token = signer.sign(claims(sub="alice", tenant="acme", roles=["operator", "viewer"]))
        caller = verifier.authenticate(bearer(token))
        assert caller == Caller(subject="alice", tenant="acme", roles=("operator", "viewer"))


def refused_cases(keys: dict[str, SigningKey]) -> list[tuple[str, list[tuple[str, str]], str]]:
    rsa_, ec_ = keys["rsa"], keys["ec"]
    now = int(time.time())
    return [
        ("no authorization metadata", [], "TOKEN_MISSING"),
        ("not a bearer header", [("authorization", "Basic YWxpY2U6cHc=")], "TOKEN_MALFORMED"),
        ("not a JWT", bearer("garbage"), "TOKEN_INVALID"),
        ("expired beyond the leeway", bearer(rsa_.sign(claims(exp=now - 120))), "TOKEN_EXPIRED"),
        (
            "nbf beyond the leeway",
            bearer(rsa_.sign(claims(nbf=now + 120, iat=now))),
            "TOKEN_NOT_YET_VALID",
        ),
        (
            "iat beyond the leeway",
            bearer(rsa_.sign(claims(iat=now + 120, nbf=None))),
            "TOKEN_NOT_YET_VALID",
        ),
        ("signed by a key not in the set", bearer(keys["rogue"].sign(claims())), "TOKEN_INVALID"),
        (
            "unknown kid",
            bearer(rsa_.sign(claims(), kid="rsa-2099-01")),
            "TOKEN_KEY_UNKNOWN",
        ),
        (
            "no kid",
            bearer(jwt.encode(claims(), rsa_.private, algorithm="RS256")),
            "TOKEN_INVALID",
        ),
        ("wrong audience", bearer(rsa_.sign(claims(aud="billing"))), "TOKEN_INVALID"),
        ("wrong issuer", bearer(rsa_.sign(claims(iss="https://evil.test/"))), "TOKEN_INVALID"),
        ("no exp", bearer(rsa_.sign(claims(exp=None))), "TOKEN_INVALID"),
        ("no iat", bearer(rsa_.sign(claims(iat=None))), "TOKEN_INVALID"),
        ("no aud", bearer(rsa_.sign(claims(aud=None))), "TOKEN_INVALID"),
        ("no iss", bearer(rsa_.sign(claims(iss=None))), "TOKEN_INVALID"),
        ("no tenant", bearer(rsa_.sign(claims(tenant=None))), "TOKEN_INVALID"),
        ("alg none", bearer(alg_none(rsa_.kid)), "TOKEN_INVALID"),
        (
            "HS256 with the public key",
            bearer(hs256_with(rsa_.public_pem, rsa_.kid)),
            "TOKEN_INVALID",
        ),
        (
            "HS256 with the JWK",
            bearer(hs256_with(json.dumps(rsa_.jwk()).encode(), rsa_.kid)),
            "TOKEN_INVALID",
        ),
        (
            "ES256 token naming the RSA key",
            bearer(jwt.encode(claims(), ec_.private, algorithm="ES256", headers={"kid": rsa_.kid})),
            "TOKEN_INVALID",
        ),
        (
            "RS384 (not configured)",
            bearer(
                jwt.encode(claims(), rsa_.private, algorithm="RS384", headers={"kid": rsa_.kid})
            ),
            "TOKEN_INVALID",
        ),
        (
            "claims changed after signing",
            bearer(tampered(rsa_.sign(claims()), roles=["supervisor"])),
            "TOKEN_INVALID",
        ),
        (
            "tenant changed after signing",
            bearer(tampered(ec_.sign(claims()), tenant="globex")),
            "TOKEN_INVALID",
        ),
    ]


def test_every_bad_token_is_refused_with_its_reason_and_never_echoed(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    cases = refused_cases(keys)
    for name, metadata, reason in cases:
        refused = refusal(verifier, metadata)
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED, name
        assert refused.reason == reason, f"{name}: {refused.reason} ({refused.message})"
        sent = dict(metadata).get("authorization", "")
        token = sent.removeprefix("Bearer ")
        if token:
            assert token not in refused.message, name
            for part in token.split("."):
                assert not part or part not in refused.message, name
        # Nothing from inside the token either (subject, tenant, issuer, audience, kid).
        for value in ("alice", "globex", "billing", "evil.test", "rsa-2099-01", "supervisor"):
            assert value not in refused.message, f"{name}: {refused.message}"
    assert len(cases) >= 20


def test_missing_exp_names_the_claim_and_clock_skew_stays_within_the_leeway(
    verifier: TokenVerifier, jwks_file: Path, keys: dict[str, SigningKey]
) -> None:
    signer, now = keys["rsa"], int(time.time())
    assert "'exp'" in refusal(verifier, bearer(signer.sign(claims(exp=None)))).message
    # Default leeway 30 s: an issuer clock a little ahead, or a token just expired, passes.
    assert verifier.authenticate(bearer(signer.sign(claims(exp=now - 10)))).subject == "alice"
    assert verifier.authenticate(bearer(signer.sign(claims(nbf=now + 10, iat=now + 10))))
    tight = TokenVerifier(jwks_config(jwks_file, jwt_leeway_s=0))
    assert refusal(tight, bearer(signer.sign(claims(exp=now - 10)))).reason == "TOKEN_EXPIRED"


# -- the key set ---------------------------------------------------------------------
def test_a_key_added_to_the_file_works_without_restart_and_a_removed_one_stops(
    jwks_file: Path, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(jwks_config(jwks_file))
    old, new = keys["rsa"], keys["rsa2"]
    assert refusal(verifier, bearer(new.sign(claims()))).reason == "TOKEN_KEY_UNKNOWN"
    write_jwks(jwks_file, old, new, keys["ec"])
    # The unknown kid re-reads the file: the new key is accepted at once.
    assert verifier.authenticate(bearer(new.sign(claims()))).subject == "alice"
    assert verifier.authenticate(bearer(old.sign(claims()))).subject == "alice"
    write_jwks(jwks_file, new, keys["ec"])
    assert isinstance(verifier.source, JwksKeys)
    assert verifier.source.reload("scheduled")
    assert refusal(verifier, bearer(old.sign(claims()))).reason == "TOKEN_KEY_UNKNOWN"
    assert verifier.authenticate(bearer(new.sign(claims()))).subject == "alice"


def test_unknown_kids_reload_the_set_at_most_once_per_interval(
    jwks_file: Path, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(jwks_config(jwks_file, jwt_jwks_min_reload_interval_s=60))
    new = keys["rsa2"]
    # Loaded at start just now: a made-up kid does not re-read it within the interval...
    for n in range(20):
        made_up = new.sign(claims(), kid=f"made-up-{n}")
        assert refusal(verifier, bearer(made_up)).reason == "TOKEN_KEY_UNKNOWN"
    write_jwks(jwks_file, keys["rsa"], keys["ec"], new)
    # ...so even a real new key waits for the interval (or the scheduled re-read).
    assert refusal(verifier, bearer(new.sign(claims()))).reason == "TOKEN_KEY_UNKNOWN"
    assert isinstance(verifier.source, JwksKeys)
    verifier.source.reload("scheduled")
    assert verifier.authenticate(bearer(new.sign(claims()))).subject == "alice"


def test_keys_are_parsed_once_and_a_bad_file_never_replaces_a_good_set(
    jwks_file: Path, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(jwks_config(jwks_file))
    source = verifier.source
    assert isinstance(source, JwksKeys)
    jwks_file.unlink()
    # No file read per call: verification uses the parsed keys in memory.
    for _ in range(50):
        assert verifier.authenticate(bearer(keys["rsa"].sign(claims()))).tenant == "acme"
    assert not source.reload("scheduled")
    jwks_file.write_text("{not json")
    assert not source.reload("scheduled")
    jwks_file.write_text(json.dumps({"keys": []}))
    assert not source.reload("scheduled")
    assert source.key_ids == sorted([keys["rsa"].kid, keys["ec"].kid])
    assert verifier.authenticate(bearer(keys["ec"].sign(claims()))).tenant == "acme"


def test_only_public_signature_keys_of_the_configured_algorithms_are_used(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    path = tmp_path / "jwks.json"
    rsa_ = keys["rsa"]
    private = RSAAlgorithm.to_jwk(keys["rsa2"].private, as_dict=True)
    mismatched = {**keys["ec"].jwk(), "alg": "RS256", "kid": "ec-claims-rsa"}
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    wrong_curve = {**ECAlgorithm.to_jwk(p384, as_dict=True), "alg": "ES256", "kid": "p384"}
    write_jwks(
        path,
        rsa_,
        keys["ec"],
        extra=(
            {**private, "kid": "private-rsa", "alg": "RS256"},
            {"kty": "oct", "k": b64(b"s" * 32), "kid": "shared", "alg": "HS256"},
            {**keys["rsa2"].jwk(), "kid": "for-encryption", "use": "enc"},
            {**keys["rsa2"].jwk(), "kid": ""},
            mismatched,
            wrong_curve,
        ),
    )
    verifier = TokenVerifier(jwks_config(path, jwt_algorithms="RS256"))
    both = TokenVerifier(jwks_config(path, jwt_algorithms="RS256,ES256")).source
    assert isinstance(both, JwksKeys)
    assert both.key_ids == sorted([rsa_.kid, keys["ec"].kid])
    source = verifier.source
    assert isinstance(source, JwksKeys)
    assert source.key_ids == [rsa_.kid]  # ES256 is not configured; the rest is unusable
    shared = hs256_with(b"s" * 32, "shared")
    assert refusal(verifier, bearer(shared)).reason == "TOKEN_INVALID"
    assert refusal(verifier, bearer(keys["ec"].sign(claims()))).reason == "TOKEN_INVALID"
    with pytest.raises(TokenKeyError, match="no usable signing key"):
        write_jwks(path, keys["ec"])
        TokenVerifier(jwks_config(path, jwt_algorithms="RS256"))


def test_a_single_pem_key_needs_no_kid_and_binds_its_algorithm_family(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(keys["rsa"].public_pem)
    verifier = TokenVerifier(
        GatewayConfig(jwt_public_key_file=str(pem), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    )
    no_kid = jwt.encode(claims(), keys["rsa"].private, algorithm="RS256")
    assert verifier.authenticate(bearer(no_kid)).subject == "alice"
    es256 = jwt.encode(claims(), keys["ec"].private, algorithm="ES256")
    assert refusal(verifier, bearer(es256)).reason == "TOKEN_INVALID"
    assert refusal(verifier, bearer(hs256_with(keys["rsa"].public_pem, ""))).reason == (
        "TOKEN_INVALID"
    )
    assert refusal(verifier, bearer(alg_none(""))).reason == "TOKEN_INVALID"
    with pytest.raises(TokenKeyError, match="jwt_algorithms allows only ES256"):
        TokenVerifier(
            GatewayConfig(
                jwt_public_key_file=str(pem),
                jwt_algorithms="ES256",
                jwt_issuer=ISSUER,
                jwt_audience=AUDIENCE,
            )
        )


def test_the_hs256_secret_works_only_in_development_mode(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    secret = tmp_path / "dev-key"
    secret.write_text("d" * 48)
    with pytest.raises(ValueError, match="jwt_dev_mode"):
        GatewayConfig(jwt_secret_file=str(secret))
    verifier = TokenVerifier(GatewayConfig(jwt_secret_file=str(secret), jwt_dev_mode=True))
    dev = jwt.encode(claims(iss="actionmesh-dev"), "d" * 48, algorithm="HS256")
    assert verifier.authenticate(bearer(dev)).subject == "alice"
    # Development mode accepts HS256 and nothing else.
    rs256 = keys["rsa"].sign(claims(iss="actionmesh-dev"))
    assert refusal(verifier, bearer(rs256)).reason == "TOKEN_INVALID"
    secret.write_text("short")
    with pytest.raises(TokenKeyError, match="at least 32 bytes"):
        TokenVerifier(GatewayConfig(jwt_secret_file=str(secret), jwt_dev_mode=True))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "to verify caller tokens"),
        ({"jwt_jwks_file": "a.json", "jwt_public_key_file": "k.pem"}, "only one source"),
        ({"jwt_jwks_file": "a.json", "jwt_algorithms": "RS256,HS256"}, "asymmetric"),
        ({"jwt_jwks_file": "a.json", "jwt_algorithms": "none"}, "asymmetric"),
        ({"jwt_jwks_file": "a.json", "jwt_leeway_s": 301}, "jwt_leeway_s"),
        ({"jwt_jwks_file": "a.json", "jwt_audience": ""}, "jwt_audience"),
        ({"jwt_jwks_url": "http://idp.example.test/jwks"}, "https"),
        ({"jwt_jwks_url": "file:///etc/passwd"}, "https"),
    ],
)
def test_token_settings_are_checked_at_start(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**settings)


def test_loopback_http_and_https_jwks_urls_are_accepted() -> None:
    for url in ("https://idp.example.test/.well-known/jwks.json", "http://127.0.0.1:8080/j"):
        assert GatewayConfig(jwt_jwks_url=url).jwt_jwks_url == url


# -- JWKS over HTTP --------------------------------------------------------------------
@dataclass
class JwksServer:
    """A JWKS endpoint on 127.0.0.1 that counts its fetches."""

    url: str
    state: dict[str, Any]

    @property
    def fetches(self) -> int:
        return int(self.state["fetches"])

    def publish(self, *signing: SigningKey) -> None:
        self.state["body"] = json.dumps({"keys": [k.jwk() for k in signing]}).encode()


@pytest.fixture
def jwks_server(keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    state: dict[str, Any] = {"fetches": 0, "body": b"", "down": False}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["fetches"] += 1
            status = 503 if state["down"] else 200
            body = b"down" if state["down"] else state["body"]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = JwksServer(f"http://127.0.0.1:{server.server_address[1]}/jwks.json", state)
    endpoint.publish(keys["rsa"], keys["ec"])
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_a_jwks_url_is_fetched_once_rotates_and_survives_an_outage(
    jwks_server: JwksServer, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(
        GatewayConfig(
            jwt_jwks_url=jwks_server.url,
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            jwt_jwks_min_reload_interval_s=0.0,
        )
    )
    assert jwks_server.fetches == 1
    for signer in (keys["rsa"], keys["ec"], keys["rsa"]):
        assert (await verifier.authenticate_async(bearer(signer.sign(claims())))).tenant == "acme"
    assert jwks_server.fetches == 1  # cached, not fetched per call
    jwks_server.publish(keys["rsa2"], keys["ec"])
    assert (await verifier.authenticate_async(bearer(keys["rsa2"].sign(claims())))).subject
    assert jwks_server.fetches == 2
    # The identity provider goes down: the last good set stays in force.
    jwks_server.state["down"] = True
    source = verifier.source
    assert isinstance(source, JwksKeys)
    assert not source.reload("scheduled")
    assert verifier.authenticate(bearer(keys["ec"].sign(claims()))).subject == "alice"
    with pytest.raises(Unauthenticated) as retired:
        await verifier.authenticate_async(bearer(keys["rsa"].sign(claims())))
    assert retired.value.reason == "TOKEN_KEY_UNKNOWN"


async def test_many_calls_with_a_new_kid_fetch_the_set_once(
    jwks_server: JwksServer, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(
        GatewayConfig(
            jwt_jwks_url=jwks_server.url,
            jwt_issuer=ISSUER,
            jwt_jwks_min_reload_interval_s=1.0,
        )
    )
    jwks_server.publish(keys["rsa"], keys["rsa2"])
    await asyncio.sleep(1.1)
    callers = await asyncio.gather(
        *(verifier.authenticate_async(bearer(keys["rsa2"].sign(claims()))) for _ in range(20))
    )
    assert {c.subject for c in callers} == {"alice"}
    assert jwks_server.fetches == 2


def test_an_unreachable_jwks_url_at_start_is_a_start_up_error(jwks_server: JwksServer) -> None:
    jwks_server.state["down"] = True
    with pytest.raises(TokenKeyError, match="cannot read it"):
        TokenVerifier(GatewayConfig(jwt_jwks_url=jwks_server.url, jwt_issuer=ISSUER))


# -- a real gateway process in JWKS mode -------------------------------------------------
JWKS_GATEWAY_FLAGS = (
    # The mesh's gateways run in development mode; this one does not.
    "--jwt-secret-file",
    "",
    "--jwt-dev-mode",
    "false",
    "--jwt-issuer",
    ISSUER,
    "--jwt-audience",
    AUDIENCE,
    "--jwt-jwks-min-reload-interval-s",
    "0.2",
    "--jwt-jwks-refresh-s",
    "0.5",
)


def workitem() -> common_pb2.RecordContext:
    return common_pb2.RecordContext(tenant="acme", type="workitem", id="wi-1001", status="failed")


async def discover(stub: Stub, token: str) -> gateway_pb2.DiscoverActionsResponse:
    reply: gateway_pb2.DiscoverActionsResponse = await stub.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=workitem(), skip_cache=True),
        metadata=bearer(token),
        timeout=10,
    )
    return reply


async def refused_reason(stub: Stub, token: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await discover(stub, token)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert token not in (refused.value.details() or "")
    return error_details(refused.value).reason


async def test_a_gateway_process_verifies_jwks_tokens_and_rotates_without_restart(
    mesh: Mesh, tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, keys["rsa"], keys["ec"])
    name = f"gateway-jwks-{uuid.uuid4().hex[:6]}"
    service = mesh.start_gateway(name, *JWKS_GATEWAY_FLAGS, "--jwt-jwks-file", str(jwks))
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = Stub(channel)

            async def sees_retry(signer: SigningKey) -> bool:
                # Visible only to acme's operator: the verified identity was used.
                reply = await discover(stub, signer.sign(claims()))
                return any(a.descriptor.action_id == "workitem.retry" for a in reply.actions)

            async def reason(signer: SigningKey) -> str:
                try:
                    await discover(stub, signer.sign(claims()))
                except grpc.aio.AioRpcError as exc:
                    return error_details(exc).reason
                return "ACCEPTED"

            for signer in (keys["rsa"], keys["ec"]):
                await eventually(functools.partial(sees_retry, signer), timeout_s=30)
            now = int(time.time())
            assert await refused_reason(stub, keys["rsa"].sign(claims(exp=now - 600))) == (
                "TOKEN_EXPIRED"
            )
            assert await refused_reason(stub, alg_none(keys["rsa"].kid)) == "TOKEN_INVALID"
            forged = hs256_with(keys["rsa"].public_pem, keys["rsa"].kid)
            assert await refused_reason(stub, forged) == "TOKEN_INVALID"
            assert await refused_reason(stub, keys["rogue"].sign(claims())) == "TOKEN_INVALID"

            # Rotation: publish the new key, then retire the old one; no restart.
            new = keys["rsa2"]
            assert await reason(new) == "TOKEN_KEY_UNKNOWN"
            write_jwks(jwks, keys["rsa"], keys["ec"], new)

            async def new_key_accepted() -> bool:
                return await reason(new) == "ACCEPTED"

            await eventually(new_key_accepted, timeout_s=15)
            write_jwks(jwks, keys["ec"], new)

            async def old_key_refused() -> bool:
                # Accepted until the scheduled re-read (every 0.5 s here) drops it.
                return await reason(keys["rsa"]) == "TOKEN_KEY_UNKNOWN"

            await eventually(old_key_refused, timeout_s=15)
            assert await reason(new) == "ACCEPTED"
            assert await reason(keys["ec"]) == "ACCEPTED"
    finally:
        mesh.stop_service(name)


async def test_a_gateway_process_fetches_its_keys_from_a_jwks_url(
    mesh: Mesh, jwks_server: JwksServer, keys: dict[str, SigningKey]
) -> None:
    name = f"gateway-jwks-url-{uuid.uuid4().hex[:6]}"
    service = mesh.start_gateway(name, *JWKS_GATEWAY_FLAGS, "--jwt-jwks-url", jwks_server.url)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = Stub(channel)
            reply = await discover(stub, keys["ec"].sign(claims()))
            assert isinstance(reply, gateway_pb2.DiscoverActionsResponse)
            assert await refused_reason(stub, keys["rsa2"].sign(claims())) == "TOKEN_KEY_UNKNOWN"
            assert jwks_server.fetches >= 1
    finally:
        mesh.stop_service(name)


def gateway_exit(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "actionmesh.gateway",
            "--port",
            "0",
            "--registry",
            "127.0.0.1:9",
            "--auditlog",
            "127.0.0.1:9",
            "--database-url",
            f"sqlite:///{tmp_path / 'gateway.db'}",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_a_gateway_with_an_hs256_secret_but_no_dev_mode_refuses_to_start(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 64)
    finished = gateway_exit(tmp_path, "--jwt-secret-file", str(secret))
    assert finished.returncode != 0
    last = finished.stderr.strip().splitlines()[-1]
    assert "jwt_secret_file" in last and "jwt_dev_mode=true" in last, finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_gateway_with_an_unusable_jwks_file_refuses_to_start(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}))
    finished = gateway_exit(tmp_path, "--jwt-jwks-file", str(jwks), "--jwt-issuer", ISSUER)
    assert finished.returncode != 0
    assert "no usable signing key" in finished.stderr.strip().splitlines()[-1], finished.stderr


# -- providers never see the token ------------------------------------------------------
@pytest.fixture(scope="module")
def token_probe(mesh: Mesh) -> Iterator[Path]:
    """tests/token_probe_provider.py in the session mesh; yields its call log."""
    service = mesh.start_provider("tests.token_probe_provider")
    try:
        yield mesh.data_dir / "data" / "providers" / "tokenprobe-calls.jsonl"
    finally:
        mesh.stop_service(service.name)


def probe_calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def test_providers_get_the_verified_identity_and_never_the_callers_token(
    mesh: Mesh, token: TokenFactory, token_probe: Path
) -> None:
    caller_token = token(subject="tara", tenant="acme", roles=("operator",))
    caller_metadata = [
        ("authorization", f"Bearer {caller_token}"),
        ("x-caller-note", "caller-only-metadata"),
    ]
    record = common_pb2.RecordContext(tenant="acme", type="tokenprobe", id="p-1", status="open")
    # The test backend vouches for the record (a trusted caller): its token is not
    # passed on either.
    backend_token = service_token(mesh)
    async with vouching_channel(mesh, token=backend_token) as channel:
        stub = Stub(channel)

        async def visible() -> bool:
            reply = await stub.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=record, skip_cache=True),
                metadata=caller_metadata,
            )
            return any(a.descriptor.action_id == "tokenprobe.touch" for a in reply.actions)

        await eventually(visible, timeout_s=20)
        reply = await stub.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id="tokenprobe.touch", record=record, idempotency_key=uuid.uuid4().hex
            ),
            metadata=caller_metadata,
            timeout=10,
        )
    assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert reply.execution.message == "touched by tara@acme"

    calls = probe_calls(token_probe)
    by_method = {c["method"] for c in calls}
    assert {"Discover", "Execute"} <= by_method, by_method
    for call in calls:
        keys_sent = {key.lower() for key, _ in call["metadata"]}
        assert "authorization" not in keys_sent, call
        assert SERVICE_METADATA not in keys_sent, call
        assert "x-caller-note" not in keys_sent, call
        for sent_token in (caller_token, backend_token):
            assert sent_token not in json.dumps(call), call
            for part in sent_token.split("."):
                assert part not in json.dumps(call["metadata"]), call
        if call["method"] in ("Discover", "Execute"):
            assert call["operator"] == {"subject": "tara", "tenant": "acme", "roles": ["operator"]}


# -- the roles claim is bounded ----------------------------------------------------------
# Imported here rather than at the top: this block is appended by another change.
from actionmesh.gateway.auth import MAX_ROLE_LENGTH, MAX_ROLES  # noqa: E402


def test_a_roles_claim_at_the_caps_is_accepted(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    roles = [f"r{index:02d}" + "x" * (MAX_ROLE_LENGTH - 3) for index in range(MAX_ROLES)]
    caller = verifier.authenticate(bearer(keys["rsa"].sign(claims(roles=roles))))
    assert caller.roles == tuple(roles)


@pytest.mark.parametrize(
    ("case", "roles", "message"),
    [
        ("one role too many", [f"role-{i}" for i in range(MAX_ROLES + 1)], "more than"),
        ("one role too long", ["operator", "s" * (MAX_ROLE_LENGTH + 1)], "longer than"),
    ],
)
def test_a_roles_claim_over_the_caps_is_refused_without_echoing_it(
    verifier: TokenVerifier, keys: dict[str, SigningKey], case: str, roles: list[str], message: str
) -> None:
    refused = refusal(verifier, bearer(keys["ec"].sign(claims(roles=roles))))
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED, case
    assert refused.reason == "TOKEN_INVALID", case
    assert message in refused.message, case
    assert "role-1" not in refused.message and "sss" not in refused.message, case


async def test_the_gateway_process_refuses_a_token_with_too_many_roles(
    mesh: Mesh, token: TokenFactory
) -> None:
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        stub = Stub(channel)
        many = token(roles=tuple(f"role-{i}" for i in range(MAX_ROLES + 1)))
        assert await refused_reason(stub, many) == "TOKEN_INVALID"
        # The same caller with a bounded claim is let through.
        reply = await discover(stub, token(roles=("operator",)))
        assert isinstance(reply, gateway_pb2.DiscoverActionsResponse)
