"""Read the providers' own databases, to prove what really changed."""

from __future__ import annotations

from actionmesh.mesh import Mesh
from actionmesh.providers.records.store import ChangeRecord, RecordStore, Ticket
from actionmesh.providers.workitems.store import WorkItem, WorkItemStore
from actionmesh.runtime.db import sqlite_url


def item_state(mesh: Mesh, tenant: str, item_id: str) -> tuple[str, list[str]]:
    """(status, trace ids of its attempts) as the provider stored them."""
    store = WorkItemStore.open(sqlite_url(mesh.data_dir / "data" / "providers" / "workitems.db"))
    try:
        item = store.get(tenant, item_id)
        assert item is not None, f"{tenant}/{item_id} is not in the provider's store"
        return item.status, [a.trace_id for a in store.attempts(tenant, item_id)]
    finally:
        store.close()


def put_item(mesh: Mesh, item: WorkItem) -> None:
    """Write a work item straight into the provider's store (its system of record)."""
    store = WorkItemStore.open(sqlite_url(mesh.data_dir / "data" / "providers" / "workitems.db"))
    try:
        store.put(item)
    finally:
        store.close()


def ticket_state(mesh: Mesh, tenant: str, ticket_id: str) -> tuple[Ticket, list[ChangeRecord]]:
    """The ticket and its change log as the records provider stored them."""
    store = RecordStore.open(sqlite_url(mesh.data_dir / "data" / "providers" / "records.db"))
    try:
        ticket = store.get(tenant, ticket_id)
        assert ticket is not None, f"{tenant}/{ticket_id} is not in the provider's store"
        return ticket, store.changes(tenant, ticket_id)
    finally:
        store.close()


def put_ticket(mesh: Mesh, ticket: Ticket) -> None:
    """Write a ticket straight into the records provider's store (its system of record)."""
    store = RecordStore.open(sqlite_url(mesh.data_dir / "data" / "providers" / "records.db"))
    try:
        store.put(ticket)
    finally:
        store.close()
