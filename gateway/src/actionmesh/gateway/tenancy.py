"""Tenant isolation, enforced by the platform before any policy runs."""

from __future__ import annotations

from actionmesh.gateway.auth import Caller
from actionmesh.rpc.errors import PermissionDenied
from actionmesh.v1 import common_pb2


def require_same_tenant(caller: Caller, record: common_pb2.RecordContext) -> None:
    if record.tenant != caller.tenant:
        raise PermissionDenied(
            "the record belongs to another tenant than the caller's token",
            reason="TENANT_MISMATCH",
        )
