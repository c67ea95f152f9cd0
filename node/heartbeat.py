"""The service's heartbeat: how the CLI (and a restarted service) tell whether it runs.

A module of its own so that ``sijnode status`` needs neither pynetdicom nor the service.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone

HEARTBEAT_NAME = "service"
HEARTBEAT_SECONDS = 5.0


def still_running(pid: int, host: str, beat_at: datetime, require_fresh: bool = False) -> bool:
    """Whether the service that wrote a heartbeat is alive: by its pid on this host, else by its age.

    ``require_fresh``: also on this host, a beat older than three periods means not running
    (hung, for the admin); a restarting service leaves such a process's claims alone.
    """
    fresh = (datetime.now(timezone.utc) - beat_at).total_seconds() < 3 * HEARTBEAT_SECONDS
    if host != socket.gethostname():
        return fresh
    if require_fresh and not fresh:
        return False
    if pid == os.getpid():
        return False  # a restart that got the same pid (e.g. in a container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True
