"""One run per output directory: a lock file that a second run writing the same ``output.dir`` refuses.

The lock is ``output.dir/.peftkit-run.lock``, created atomically (``O_CREAT |
O_EXCL``) and holding the owner's pid, host and process start time. A lock
whose owner is gone (same host, and the pid is dead or now belongs to a
process started later) is stale: the next run takes it over and says so. A
lock from another host cannot be checked from here, so it is refused with the
path to remove once that run is known to be over. Under several processes
(torchrun) only rank 0 takes it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from peftkit._process import pid_alive
from peftkit.errors import TrainingError

__all__ = ["LOCK_FILE", "RunLock"]

LOCK_FILE = ".peftkit-run.lock"

#: Lock files this process holds: a second run in the same process is refused too, and a lock
#: naming our pid that is not in here was left by an earlier process that had the same pid.
_HELD: set[Path] = set()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def _alive(pid: int, start: str | None) -> bool:
    if not pid_alive(pid):
        return False
    current = _start_time(pid)
    return start is None or current is None or current == start


class RunLock:
    """The lock of one output directory.

    :param directory: the run's ``output.dir`` (created if missing).
    :param enabled: take the lock at all (``False`` on every rank but 0).
    """

    def __init__(self, directory: Path, *, enabled: bool = True):
        self.path = Path(directory) / LOCK_FILE
        self.enabled = enabled
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when it took over a stale one.

        :raises TrainingError: if another live run holds it, naming the directory and the owner's pid and host.
        """
        if not self.enabled or self.held:
            return None
        note = None
        for _ in range(2):  # a stale lock is removed once, then created again
            if self._create_or_explain():
                self.held = True
                _HELD.add(self.path.resolve())
                return note
            note = self._take_over_stale()
        raise TrainingError(f"cannot lock {self.path}: it keeps reappearing; another run is starting in the same output.dir")

    def release(self) -> None:
        """Give the lock up (idempotent; only the lock this object took)."""
        if not self.held:
            return
        self.held = False
        _HELD.discard(self.path.resolve())
        if self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------ helpers
    def _create_or_explain(self) -> bool:
        """:meth:`_create`, with an ``output.dir`` the file system refuses reported as one error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._create()
        except OSError as exc:  # _create answers an existing lock itself; this is the folder (a file, read-only, ...)
            raise TrainingError(
                f"output.dir = {str(self.path.parent)!r} cannot be written: {exc.strerror or exc} ({exc.filename or self.path}); "
                "set output.dir to a folder you can write"
            ) from None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
        try:
            os.write(fd, json.dumps(owner).encode())  # one small write: readers never see half of it in practice
        finally:
            os.close(fd)
        return True

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _take_over_stale(self) -> str:
        """Remove the lock if its owner is gone and say so; otherwise refuse."""
        owner = self._owner()
        pid, host = owner.get("pid"), owner.get("host")
        directory = self.path.parent
        if not isinstance(pid, int) or host is None:
            raise TrainingError(
                f"output.dir {directory} is locked by {self.path}, which names no owner (a run may be starting there "
                "right now); use another output.dir, or remove that lock file once no run writes there"
            )
        if host != socket.gethostname():
            raise TrainingError(
                f"output.dir {directory} is in use by the run of pid {pid} on host {host} (lock {self.path}); this host "
                "cannot check whether it still runs. Use another output.dir, or remove the lock file once that run is over"
            )
        ours = pid == os.getpid() and self.path.resolve() in _HELD
        if ours or (pid != os.getpid() and _alive(pid, owner.get("start"))):
            raise TrainingError(
                f"output.dir {directory} is in use by another run (pid {pid} on this host{', this process' if ours else ''}; "
                f"lock {self.path}); two runs writing one directory would mix their checkpoints and metrics. Wait for it "
                "to finish, or use another output.dir"
            )
        self.path.unlink(missing_ok=True)
        return f"took over the stale lock of pid {pid} (that process is gone) in {directory}"
