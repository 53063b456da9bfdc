"""Example provider: escalates a ticket or work item to the external support platform.

The platform is :mod:`actionmesh.providers.supportdesk`, a separate HTTP service. Run the
provider with ``ACTIONMESH_ESCALATION_PLATFORM_URL=http://127.0.0.1:8780
python -m actionmesh.providers.escalation --port 0 --registry 127.0.0.1:NNNN``.
"""

from actionmesh.providers.escalation.config import EscalationConfig, PlatformNotConfigured
from actionmesh.providers.escalation.platform import SupportDeskClient
from actionmesh.providers.escalation.provider import EscalateInputs, current_log, escalation
from actionmesh.providers.escalation.store import EscalationLog, LoggedEscalation

__all__ = [
    "EscalateInputs",
    "EscalationConfig",
    "EscalationLog",
    "LoggedEscalation",
    "PlatformNotConfigured",
    "SupportDeskClient",
    "current_log",
    "escalation",
]
