"""Settings of the support platform process (flags, or ACTIONMESH_SUPPORTDESK_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actionmesh.runtime.db import sqlite_url

ENV_PREFIX = "ACTIONMESH_SUPPORTDESK"


@dataclass(frozen=True)
class SupportDeskConfig:
    """Configuration of the stand-in external support platform."""

    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = 8780
    """Port to listen on; 0 picks a free port (written to the ready file)."""

    data_dir: str = ".actionmesh/supportdesk"
    """Directory for the platform's files (its SQLite database by default)."""

    database_url: str | None = None
    """SQLAlchemy URL of the platform's store. Default: a SQLite file data_dir/supportdesk.db."""

    ready_file: str | None = None
    """Write {"pid", "port", "address", "url"} as JSON here once listening."""

    connection_timeout_s: float = 10.0
    """How long a client connection may stay idle (e.g. a body that never arrives)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.connection_timeout_s <= 0:
            raise ValueError("connection_timeout_s must be positive")

    @property
    def store_url(self) -> str:
        return self.database_url or sqlite_url(Path(self.data_dir) / "supportdesk.db")
