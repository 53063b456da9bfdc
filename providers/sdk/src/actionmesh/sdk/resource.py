"""A holder for what a provider opens in ``on_start`` and closes in ``on_stop``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from actionmesh.sdk.config import ProviderConfig
    from actionmesh.sdk.provider import Provider

T = TypeVar("T")


class Resource(Generic[T]):
    """One object (a store, a client) that exists only while the provider runs.

    ::

        store: Resource[MyStore] = Resource("the store")
        store.bind(
            provider,
            open=lambda config: MyStore.open(config.database_url_for(provider.id)),
            seed=MyStore.seed_demo,  # only with --seed-demo
            close=MyStore.close,
        )
        ...
        store.get().do_something()      # in a handler

    ``bind`` writes the ``on_start``/``on_stop`` hooks; plain functions run in a worker
    thread (a blocking store must not stall the event loop), coroutines are awaited.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._value: T | None = None

    def get(self) -> T:
        """The object; RuntimeError outside on_start .. on_stop."""
        if self._value is None:
            raise RuntimeError(f"{self._what} is not open; is the provider running?")
        return self._value

    def set(self, value: T) -> None:
        self._value = value

    def take(self) -> T | None:
        """Remove and return the object (None if it was never opened), to close it."""
        value, self._value = self._value, None
        return value

    def bind(
        self,
        provider: Provider,
        *,
        open: Callable[[ProviderConfig], T | Awaitable[T]],
        seed: Callable[[T], object] | None = None,
        close: Callable[[T], object] | None = None,
    ) -> None:
        """Open the object when ``provider`` starts (then ``seed`` it with demo data when
        the provider runs with ``seed_demo``) and ``close`` it when it stops."""

        async def open_resource(config: ProviderConfig) -> None:
            value = await _call(open, config)
            if seed is not None and config.seed_demo:
                await _call(seed, value)
            self.set(value)

        async def close_resource() -> None:
            value = self.take()
            if value is not None and close is not None:
                await _call(close, value)

        open_resource.__qualname__ = f"open {self._what}"
        close_resource.__qualname__ = f"close {self._what}"
        provider.on_start(open_resource)
        provider.on_stop(close_resource)


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    if inspect.iscoroutinefunction(function):
        return await function(*args)
    result = await asyncio.to_thread(function, *args)
    return await result if inspect.isawaitable(result) else result
