"""Example provider: retries failed or stuck work items kept in its own SQLite store.

Run it with ``python -m providers.workitems --port 0 --registry 127.0.0.1:NNNN``.
"""

from providers.workitems.provider import RetryInputs, current_store, workitems
from providers.workitems.store import Attempt, WorkItem, WorkItemStore

__all__ = ["Attempt", "RetryInputs", "WorkItem", "WorkItemStore", "current_store", "workitems"]
