"""A holder for what a provider opens in ``on_start`` and closes in ``on_stop``."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Resource(Generic[T]):
    """One object (a store, a client) that exists only while the provider runs.

    ::

        store: Resource[MyStore] = Resource("the store")

        @provider.on_start
        async def open_store(config: ProviderConfig) -> None:
            store.set(MyStore.open(config.database_url_for(provider.id)))

        @provider.on_stop
        async def close_store() -> None:
            if (s := store.take()) is not None:
                s.close()
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
