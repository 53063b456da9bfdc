"""Example provider: controlled, reversible changes to tickets kept in its own SQLite store.

Run it with ``python -m actionmesh.providers.records --port 0 --registry 127.0.0.1:NNNN``.
"""

from actionmesh.providers.records.provider import current_store, records
from actionmesh.providers.records.store import ChangeRecord, LinkTarget, RecordStore, Ticket

__all__ = ["ChangeRecord", "LinkTarget", "RecordStore", "Ticket", "current_store", "records"]
