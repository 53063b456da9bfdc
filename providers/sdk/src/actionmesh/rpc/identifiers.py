"""The identifier rules of the contract, in one place.

Every service judges a provider id, an action id, a record type... by the rule here:
the registry when a provider registers, the gateway on each request, the SDK when
an action is declared, the stand-in support platform on its HTTP API. A rule is
matched against the whole string (``fullmatch``: no trailing newline slips through
as it does with ``$``), is ASCII only (so a look-alike letter from another script is
refused) and bounds the length. Copies of these patterns drifted once (issue 16):
use these, never a pattern of your own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "ACTION_ID",
    "ATTRIBUTE_KEY",
    "IDEMPOTENCY_KEY",
    "INPUT_NAME",
    "PROVIDER_ID",
    "REASON",
    "RECORD_ID",
    "RECORD_TYPE",
    "RULES",
    "TENANT",
    "IdentifierRule",
]


@dataclass(frozen=True)
class IdentifierRule:
    """One kind of identifier: its pattern (whole string) and its longest length."""

    name: str
    """What the identifier is, for messages (``action id``)."""
    regex: str
    """The pattern, unanchored: it must match the whole value."""
    max_length: int
    """Longest accepted value, in characters."""
    example: str
    """A valid value, for messages and tests."""
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)
    """``regex`` compiled (set from it, never passed)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.regex, re.ASCII))
        if not self.valid(self.example):
            raise ValueError(f"{self.name}: the example {self.example!r} breaks the rule")

    @property
    def pattern(self) -> str:
        """The rule as a regular expression anchored at both ends, for messages."""
        return f"^{self.regex}$"

    def valid(self, value: object) -> bool:
        """Whether ``value`` is a string this rule accepts."""
        return (
            isinstance(value, str)
            and len(value) <= self.max_length
            and self.compiled.fullmatch(value) is not None
        )

    def describe(self) -> str:
        """What a valid value looks like, for a field violation."""
        return (
            f"must match {self.pattern} (e.g. {self.example!r}), "
            f"at most {self.max_length} characters"
        )


PROVIDER_ID = IdentifierRule("provider id", r"[a-z][a-z0-9_.-]{1,62}", 63, "workitems")
ACTION_ID = IdentifierRule(
    "action id", r"[a-z][a-z0-9_-]*(?:\.[a-z][a-z0-9_-]*)+", 128, "workitem.retry"
)
RECORD_TYPE = IdentifierRule("record type", r"[a-z][a-z0-9_.-]{0,63}", 64, "workitem")
RECORD_ID = IdentifierRule("record id", r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,255}", 256, "wi-1001")
IDEMPOTENCY_KEY = IdentifierRule(
    "idempotency key", r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", 128, "retry-wi-1001-1"
)
TENANT = IdentifierRule("tenant", r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", 128, "acme")
ATTRIBUTE_KEY = IdentifierRule("attribute key", r"[A-Za-z][A-Za-z0-9_.-]{0,63}", 64, "region")
INPUT_NAME = IdentifierRule("input name", r"[a-z][a-z0-9_]{0,63}", 64, "reason")
REASON = IdentifierRule("reason", r"[A-Z][A-Z0-9_]{0,63}", 64, "STATUS_NOT_FAILED")

RULES: tuple[IdentifierRule, ...] = (
    PROVIDER_ID,
    ACTION_ID,
    RECORD_TYPE,
    RECORD_ID,
    IDEMPOTENCY_KEY,
    TENANT,
    ATTRIBUTE_KEY,
    INPUT_NAME,
    REASON,
)
