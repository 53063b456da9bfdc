"""Read the workitems provider's own database, to prove what really changed."""

from __future__ import annotations

from actionmesh.mesh import Mesh
from actionmesh.rpc.db import sqlite_url
from providers.workitems.store import WorkItemStore


def item_state(mesh: Mesh, tenant: str, item_id: str) -> tuple[str, list[str]]:
    """(status, trace ids of its attempts) as the provider stored them."""
    store = WorkItemStore.open(sqlite_url(mesh.data_dir / "data" / "providers" / "workitems.db"))
    try:
        item = store.get(tenant, item_id)
        assert item is not None, f"{tenant}/{item_id} is not in the provider's store"
        return item.status, [a.trace_id for a in store.attempts(tenant, item_id)]
    finally:
        store.close()
