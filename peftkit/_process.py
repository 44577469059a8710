"""Whether a process that left a file behind (a save's temporary directory, a run's lock) still runs."""

from __future__ import annotations

import os

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a signal-0 probe).

    ``True`` where that cannot be told: on Windows (``os.kill(pid, 0)`` would
    terminate the process there) and for another user's process (EPERM).
    """
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True
