"""Resumable benchmark runs shared by several worker processes: each run is one result file; a
worker claims a run by creating ``<file>.lock`` (exclusively, holding its pid) and skips runs that
are done or claimed by a live process. A lock left by a killed worker is taken over."""

from __future__ import annotations

import os
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(result: Path) -> bool:
    """True if this process may run the run whose result goes to ``result`` (now locked for it)."""
    lock = result.with_name(result.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            lock.unlink(missing_ok=True)  # left by a killed worker
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def release(result: Path) -> None:
    """Drop the lock of a finished (or failed) run."""
    result.with_name(result.name + ".lock").unlink(missing_ok=True)
