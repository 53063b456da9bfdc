"""Sensitive records: inputs become digests in evidence, and never echo in messages.

A digest still proves which value was used (recompute it from a candidate
value) without the audit trail holding the value. With a redaction key the
digest is an HMAC, so short or enumerable values cannot be guessed from it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from actionmesh.rpc.convert import display_input, input_value_to_python
from actionmesh.v1 import common_pb2

REDACTED = "[redacted]"
# Shorter values would blank out ordinary words and numbers in a message.
MIN_SCRUB_CHARS = 3


def is_sensitive(record: common_pb2.RecordContext) -> bool:
    return record.sensitivity in (
        common_pb2.SENSITIVITY_SENSITIVE,
        common_pb2.SENSITIVITY_RESTRICTED,
    )


class Redactor:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    @classmethod
    def from_key_file(cls, path: str) -> Redactor:
        return cls(Path(path).read_bytes().strip() if path else None)

    def digest(self, name: str, value: str) -> str:
        # The input's name is part of the digest, so equal values of different
        # inputs cannot be matched against each other.
        message = f"{name}\x00{value}".encode()
        if self._key is None:
            return "sha256:" + hashlib.sha256(message).hexdigest()
        return "hmac-sha256:" + hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def evidence(
        self, inputs: Mapping[str, common_pb2.InputValue], sensitive: bool
    ) -> dict[str, str]:
        """Inputs as the audit event shows them: display strings, or digests."""
        shown = {name: display_input(value) for name, value in inputs.items()}
        if not sensitive:
            return shown
        return {name: self.digest(name, text) for name, text in shown.items()}

    @staticmethod
    def scrub(text: str, inputs: Mapping[str, common_pb2.InputValue], sensitive: bool) -> str:
        """Remove input values a provider echoed in a reason or message."""
        if not sensitive or not text:
            return text
        values = sorted(
            {
                str(v)
                for v in (input_value_to_python(i) for i in inputs.values())
                if v is not None and not isinstance(v, bool) and len(str(v)) >= MIN_SCRUB_CHARS
            },
            key=len,
            reverse=True,
        )
        for value in values:
            text = text.replace(value, REDACTED)
        return text
