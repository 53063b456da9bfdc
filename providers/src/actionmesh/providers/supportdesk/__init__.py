"""A stand-in external support platform: a small HTTP/JSON service with its own store.

It represents a third-party SaaS that the ``escalation`` provider hands cases
off to, so it is deliberately *not* an actionmesh service: no gRPC, no
registry, its own SQLite database. It honours ``Idempotency-Key`` on create
(same key and body: the same escalation with 200; same key, other body: 409).
Run it with ``python -m actionmesh.providers.supportdesk --port 0 --ready-file F``; see
:mod:`actionmesh.providers.supportdesk.server` for the endpoints.
"""

from actionmesh.providers.supportdesk.config import SupportDeskConfig
from actionmesh.providers.supportdesk.server import SupportDesk, is_healthy, start_supportdesk
from actionmesh.providers.supportdesk.store import Escalation, EscalationStore

__all__ = [
    "Escalation",
    "EscalationStore",
    "SupportDesk",
    "SupportDeskConfig",
    "is_healthy",
    "start_supportdesk",
]
