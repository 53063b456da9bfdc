"""Client channels with OpenTelemetry propagation, shared by services and the CLI."""

from __future__ import annotations

import grpc.aio

from actionmesh.rpc.telemetry import client_interceptors
from actionmesh.rpc.tls import TlsConfig


def open_channel(target: str, tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """A channel to a mesh peer carrying trace context: TLS when ``tls`` is enabled.

    With TLS the peer's certificate must chain to ``tls.ca_file`` and name the host
    in ``target``; this process presents ``tls.cert_file`` when it has one.
    """
    interceptors = client_interceptors()
    options = [("grpc.enable_retries", 0)]
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(
            target, tls.channel_credentials(), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, interceptors=interceptors, options=options)
