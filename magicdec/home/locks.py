"""Progress lines on stderr, and the exclusive file lock that one-time work (a kernel build, a GGUF
conversion) takes so that concurrent processes do it once.

The lock is an `flock`: the kernel releases it when its holder exits or is killed, so a crashed holder
never blocks anyone. A lock taken with `remove` has its file only while it is held (or after a holder was
killed). Where the file system cannot lock (or on Windows), work runs unlocked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]


def say(message: str) -> None:
    """One progress line on stderr, at once (stdout stays the program's output)."""
    print(f"magicdec: {message}", file=sys.stderr, flush=True)


@contextmanager
def exclusive(path: Path, waiting: Callable[[IO[str]], str], remove: bool = False) -> Iterator[IO[str] | None]:
    """Hold an exclusive lock on the file `path` (created if missing; with `remove`, removed on release, so
    that no empty lock file stays behind). While another process holds it, say `waiting(file)` once (the file
    may name its holder) and wait. Yields the open file, or None where the file system cannot lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = _locked(path, waiting) if fcntl is not None else None
    if f is None:
        yield None
        return
    try:
        yield f
    finally:
        if remove:
            try:
                path.unlink()  # while still held: a process waiting on this file finds it gone and locks a new one
            except OSError:
                pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _locked(path: Path, waiting: Callable[[IO[str]], str]) -> IO[str] | None:
    """The lock file, opened and locked; None where the file system cannot lock. A holder removes the file when
    it releases it, so a lock taken on a file no longer at `path` is dropped and taken again on the new one."""
    said = False
    while True:
        f = open(path, "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    f.seek(0)
                    say(waiting(f))
                    said = True
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                current = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                current = False
        except OSError:  # no locking on this file system
            f.close()
            return None
        except BaseException:  # Ctrl-C while waiting
            f.close()
            raise
        if current:
            return f
        f.close()
