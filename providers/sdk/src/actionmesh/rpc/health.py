"""A container health probe: ``python -m actionmesh.rpc.health HOST:PORT``.

Exits 0 when the grpc.health.v1 default service answers SERVING, 1 otherwise,
so a Dockerfile ``HEALTHCHECK`` needs no extra binary (grpc_health_probe).

When the service in the container serves TLS (its ``ACTIONMESH_<SVC>_TLS_*_FILE``
variables are set), the probe connects with the same files, presenting the
service's own certificate, so the ``HEALTHCHECK`` line needs no change.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.rpc.tls import HAVE_CRYPTOGRAPHY, TlsConfig, TlsConfigError


def is_serving(
    address: str,
    *,
    service: str = "",
    timeout_s: float = 3.0,
    tls: TlsConfig | None = None,
    server_name: str = "",
) -> bool:
    """Whether ``service`` at ``address`` is SERVING (False when unreachable).

    ``server_name`` is the name checked against the server's certificate when it
    differs from the host in ``address`` (a probe of 127.0.0.1 inside a container).
    """
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.secure_channel(address, tls.channel_credentials(), options=options)
        if tls is not None and tls.enabled
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def own_server_name(tls: TlsConfig, host: str) -> str:
    """A name the service's own certificate carries, unless it already covers ``host``.

    The probe talks to the process whose certificate it presents, so that
    certificate's first DNS name is what the server will present back. Needs
    ``cryptography`` (the SDK's ``tls`` extra); without it, the host as given.
    """
    if not HAVE_CRYPTOGRAPHY:
        return ""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificates(Path(tls.cert_file).read_bytes())[0]
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return ""
    names = sans.get_values_for_type(x509.DNSName)
    addresses = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    if host.strip("[]") in (*names, *addresses) or not names:
        return ""
    return names[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actionmesh.rpc.health", description=__doc__.splitlines()[0]
    )
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help="service name (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument(
        "--tls-ca", default="", help="CA (PEM); default: the ACTIONMESH_<SVC>_TLS_* variables"
    )
    parser.add_argument("--tls-cert", default="", help="client certificate (PEM) to present")
    parser.add_argument("--tls-key", default="", help="key (PEM) of --tls-cert")
    parser.add_argument(
        "--tls-server-name", default="", help="name the server's certificate must carry"
    )
    args = parser.parse_args(argv)
    try:
        tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_ca)
        if not tls.enabled:
            tls = TlsConfig.from_service_env()
        tls.check(server=False)
    except TlsConfigError as exc:
        parser.error(str(exc))
    server_name = args.tls_server_name
    if tls.enabled and tls.has_identity and not server_name:
        server_name = own_server_name(tls, args.address.rsplit(":", 1)[0])
    serving = is_serving(
        args.address,
        service=args.service,
        timeout_s=args.timeout,
        tls=tls,
        server_name=server_name,
    )
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
