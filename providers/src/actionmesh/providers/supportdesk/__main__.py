"""``python -m actionmesh.providers.supportdesk``: run the stand-in support platform.

It serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType

from actionmesh.providers.supportdesk.config import ENV_PREFIX, SupportDeskConfig
from actionmesh.providers.supportdesk.server import start_supportdesk
from actionmesh.rpc.config import load_config
from actionmesh.rpc.server import configure_logging, write_ready_file


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    config = load_config(
        SupportDeskConfig,
        env_prefix=ENV_PREFIX,
        argv=argv,
        description="A stand-in external support platform (HTTP/JSON) that escalations go to.",
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before listening, so a SIGTERM right after start still stops cleanly.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    desk = start_supportdesk(config)
    try:
        write_ready_file(
            config.ready_file,
            name="supportdesk",
            port=desk.port,
            address=desk.address,
            url=desk.url,
        )
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        desk.stop()


if __name__ == "__main__":
    main()
