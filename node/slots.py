"""Association slots counted node-wide, across the receiver processes that share one port.

With ``receiver.processes`` > 1 the kernel spreads connections over processes (SO_REUSEPORT), and
each process sees only its own associations. So that ``max_associations``,
``reserved_peer_associations`` and ``max_associations_per_source`` bound the node as a whole,
every process publishes the source addresses of the associations it holds slots for in one small
JSON file, and admits an association only while it holds an exclusive ``flock`` on that file.

Why a file and flock: the kernel drops the lock when its holder dies, even by kill -9, so a dead
receiver process never blocks the others (a multiprocessing lock held by a killed process
would). The entries of a process that is no longer alive are ignored, so its slots free as soon
as it is gone; the service empties the file at start. Nothing here must survive a reboot: the
file is replaced by rename and never fsynced.

The lock is held only to read, decide and write, never while waiting for another thread: an
association's slot is taken before its A-ASSOCIATE-AC is sent and given back when its connection
closes (``release``), or when its thread is found ended (``reconcile``, in case a close went
unnoticed).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class SlotBoard:
    """The association slots of all receiver processes of one service (see the module doc).

    ``path`` None: a board private to this process (one receiver process, or tests).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pid = os.getpid()
        self._lock = threading.Lock()  # this process's threads; flock orders the processes
        self._mine: dict[Any, str] = {}  # association (a thread) -> its source address

    def reset(self) -> None:
        """Forget every entry (the service, before any receiver process starts)."""
        if self.path is not None:
            with self._file_locked():
                self._write({})

    def admit(self, association: Any, address: str, refusal: Callable[[list[str]], str | None]) -> str | None:
        """Take a slot for ``association`` unless ``refusal`` (given the source addresses of every
        slot taken node-wide) says why not; returns that reason, or None with the slot taken."""
        with self._changing() as elsewhere:
            reason = refusal([*self._mine.values(), *elsewhere])
            if reason is None:
                self._mine[association] = address
            return reason

    def release(self, association: Any) -> None:
        """Give back the slot of an association that ended (or was never established)."""
        if association in self._mine:
            with self._changing():
                self._mine.pop(association, None)

    def reconcile(self) -> None:
        """Give back the slots of associations whose thread has ended."""
        if any(not association.is_alive() for association in list(self._mine)):
            with self._changing():
                self._mine = {a: address for a, address in self._mine.items() if a.is_alive()}

    @property
    def held(self) -> list[str]:
        """The source addresses this process holds slots for."""
        return list(self._mine.values())

    @contextmanager
    def _changing(self) -> Iterator[list[str]]:
        """Hold the board; yields the other processes' addresses; publishes ``_mine`` after."""
        with self._lock:
            if self.path is None:
                yield []
                return
            with self._file_locked():
                entries = {owner: held for owner, held in self._read().items() if int(owner) != self.pid}
                yield [address for held in entries.values() for address in held]
                if self._mine:
                    entries[str(self.pid)] = list(self._mine.values())
                self._write(entries)

    # -- the file ----------------------------------------------------------------------------
    @contextmanager
    def _file_locked(self) -> Iterator[None]:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, list[str]]:
        assert self.path is not None
        try:
            entries = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {owner: list(held) for owner, held in entries.items() if _alive(int(owner))}

    def _write(self, entries: dict[str, list[str]]) -> None:
        assert self.path is not None
        temporary = self.path.with_name(f"{self.path.name}.{self.pid}.tmp")
        temporary.write_text(json.dumps(entries))
        os.replace(temporary, self.path)
