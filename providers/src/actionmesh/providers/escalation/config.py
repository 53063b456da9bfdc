"""Settings of the escalation provider beyond the SDK's (ACTIONMESH_ESCALATION_* variables).

The SDK owns the provider's command line (``ProviderConfig``), so these are read
from the environment only, with :meth:`EscalationConfig.from_env`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from actionmesh.rpc.config import load_config

ENV_PREFIX = "ACTIONMESH_ESCALATION"


class PlatformNotConfigured(RuntimeError):
    """The provider was started without the support platform's URL."""


@dataclass(frozen=True)
class EscalationConfig:
    """How the escalation provider reaches the external support platform."""

    platform_url: str = ""
    """Base URL of the support platform, e.g. http://127.0.0.1:8780 (required: the
    provider refuses to start without it)."""

    request_timeout_s: float = 8.0
    """Upper bound of one call to the platform; the caller's deadline shortens it."""

    connect_timeout_s: float = 2.0
    """How long to wait for a connection. A platform not reachable within it is
    UNAVAILABLE: nothing was sent, so a retry is safe."""

    trust_env_proxy: bool = False
    """Reach the platform through HTTP(S)_PROXY / NO_PROXY from the environment."""

    outcome_settle_s: float = 120.0
    """After an escalation's outcome was unknown (PARTIAL DOWNSTREAM_OUTCOME_UNKNOWN),
    how long the platform may still open it (a request it is slow to handle). Within it,
    GetExecutionStatus answers RUNNING while the platform holds no escalation for the
    key; after it, the platform's "none" is final (REJECTED DOWNSTREAM_NOT_CREATED).
    Keep it above the longest time the platform takes to handle a request."""

    open_retry_s: float = 60.0
    """How long the background task keeps re-sending the escalation (same
    Idempotency-Key) while the platform does not answer; then REJECTED
    DOWNSTREAM_UNAVAILABLE (nothing was created) or PARTIAL DOWNSTREAM_OUTCOME_UNKNOWN
    (a request went unanswered after it was sent)."""

    retry_interval_s: float = 2.0
    """Pause between two attempts to open the escalation (the platform's Retry-After,
    when it sends one, wins)."""

    acknowledge_poll_s: float = 1.0
    """How often the background task asks the platform whether the support team
    acknowledged the escalation."""

    def __post_init__(self) -> None:
        for name in ("retry_interval_s", "acknowledge_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.open_retry_s < 0:
            raise ValueError("open_retry_s must not be negative")
        url = urlsplit(self.platform_url)
        if self.platform_url and (url.scheme not in ("http", "https") or not url.netloc):
            raise ValueError(f"platform_url must be an http(s) URL, got {self.platform_url!r}")
        for name in ("request_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.outcome_settle_s < 0:
            raise ValueError("outcome_settle_s must not be negative")

    @classmethod
    def from_env(cls) -> EscalationConfig:
        """Read ``ACTIONMESH_ESCALATION_*``; the URL is required."""
        # argv=[]: the SDK owns the provider's command line.
        config = load_config(cls, env_prefix=ENV_PREFIX, argv=[])
        if not config.platform_url:
            raise PlatformNotConfigured(
                f"set {ENV_PREFIX}_PLATFORM_URL to the support platform's base URL "
                "(e.g. http://127.0.0.1:8780); the escalation provider does not start without it"
            )
        return config
