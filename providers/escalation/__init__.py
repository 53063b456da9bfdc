"""Example provider: escalates a ticket or work item to the external support platform.

The platform is :mod:`providers.supportdesk`, a separate HTTP service. Run the
provider with ``ACTIONMESH_ESCALATION_PLATFORM_URL=http://127.0.0.1:8780
python -m providers.escalation --port 0 --registry 127.0.0.1:NNNN``.
"""

from providers.escalation.config import EscalationConfig, PlatformNotConfigured
from providers.escalation.platform import SupportDeskClient
from providers.escalation.provider import EscalateInputs, current_log, escalation
from providers.escalation.store import EscalationLog, LoggedEscalation

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
