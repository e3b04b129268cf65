"""Progress lines on stderr, and the exclusive file lock that one-time work (a kernel build, a GGUF
conversion) takes so that concurrent processes do it once.

The lock is an `flock`: the kernel releases it when its holder exits or is killed, so a crashed holder
never blocks anyone. Where the file system cannot lock (or on Windows), work runs unlocked.
"""

from __future__ import annotations

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
def exclusive(path: Path, waiting: Callable[[IO[str]], str]) -> Iterator[IO[str] | None]:
    """Hold an exclusive lock on the file `path` (created if missing). While another process holds it,
    say `waiting(file)` (the file may name its holder) and wait. Yields the open file, or None where
    the file system cannot lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is None:
            yield None
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            say(waiting(f))
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield None
            return
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
