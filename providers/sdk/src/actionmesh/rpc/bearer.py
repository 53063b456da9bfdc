"""``authorization: Bearer <token>`` call metadata, read the same way by every service."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class MalformedAuthorization(ValueError):
    """An authorization header that is not ``Bearer <token>``."""


def bearer_tokens(metadata: Iterable[Any] | None) -> Iterator[str]:
    """The tokens of the call's authorization headers, in order.

    Lazy, so a caller that takes the first one does not judge the headers after it;
    MalformedAuthorization when a header it reaches is not a bearer token.
    """
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise MalformedAuthorization("authorization metadata must be 'Bearer <token>'")
        yield token
