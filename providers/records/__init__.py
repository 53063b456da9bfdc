"""Example provider: controlled, reversible changes to tickets kept in its own SQLite store.

Run it with ``python -m providers.records --port 0 --registry 127.0.0.1:NNNN``.
"""

from providers.records.provider import current_store, records
from providers.records.store import ChangeRecord, LinkTarget, RecordStore, Ticket

__all__ = ["ChangeRecord", "LinkTarget", "RecordStore", "Ticket", "current_store", "records"]
