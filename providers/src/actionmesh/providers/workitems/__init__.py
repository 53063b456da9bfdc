"""Example provider: retries failed or stuck work items kept in its own SQLite store, and
reprocesses stuck inbound emails into tickets.

Run it with ``python -m actionmesh.providers.workitems --port 0 --registry 127.0.0.1:NNNN``.
"""

from actionmesh.providers.workitems.provider import (
    ReprocessEmailInputs,
    RetryInputs,
    current_store,
    workitems,
)
from actionmesh.providers.workitems.store import (
    Attempt,
    EmailTicket,
    InboundEmail,
    WorkItem,
    WorkItemStore,
)

__all__ = [
    "Attempt",
    "EmailTicket",
    "InboundEmail",
    "ReprocessEmailInputs",
    "RetryInputs",
    "WorkItem",
    "WorkItemStore",
    "current_store",
    "workitems",
]
