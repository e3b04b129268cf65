"""Conversions done once and cached on disk (a GGUF file's weights, its tokenizer), safe when several
processes ask for the same one at once, as the ranks of a `torchrun` job do.

One process converts while the others wait on a lock file next to the cache directory (`flock`: the
kernel releases it when its owner dies, so a crashed owner never blocks anyone). The converter writes
into a temporary folder, moves each file into place with `os.replace` and writes a manifest of their
sizes last: a conversion is complete when its manifest is there and every file has the recorded size.
An interrupted conversion leaves no temporary files behind; a damaged one (a truncated file) is
rebuilt with a message.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from magicdec.home.locks import exclusive, say


def manifest_path(dest: Path, step: str) -> Path:
    return dest / f".{step}.done"


def damage(dest: Path, step: str) -> str | None:
    """Why the `step` conversion in `dest` is incomplete or damaged ("" when absent), or None when complete."""
    manifest = manifest_path(dest, step)
    if not manifest.is_file():
        return ""
    try:
        sizes: dict[str, int] = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{manifest} is unreadable"
    for name, size in sizes.items():
        f = dest / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes instead of {size} (truncated or overwritten)"
    return None


@contextmanager
def conversion_lock(dest: Path) -> Iterator[None]:
    """Hold `<dest>.lock` exclusively: wait (saying for whom) while another process holds it; take it
    over, saying so, when the process that held it last died before releasing it cleanly."""
    waiting = lambda f: f"waiting for process {f.read().strip() or '?'} to finish converting into {dest}"  # noqa: E731
    with exclusive(dest.parent / f"{dest.name}.lock", waiting, remove=True) as f:
        if f is None:  # no working lock on this file system: convert unlocked
            yield
            return
        f.seek(0)
        owner = f.read().strip()
        if owner:  # a holder writes its pid, and the file goes on release: this one died while converting
            say(f"process {owner} was converting into {dest} and is gone; taking over")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield  # on release (a failed conversion too) `exclusive` removes the lock file


def convert_once(dest: Path, step: str, convert: Callable[[Path], None], what: str) -> None:
    """Make `dest` hold the complete output of `convert(folder)` (which writes its files into `folder`),
    running it only if no process did so before; `what` names the conversion in the progress lines."""
    if damage(dest, step) is None:
        return
    with conversion_lock(dest):
        reason = damage(dest, step)
        if reason is None:  # another process converted while this one waited
            return
        if reason:
            say(f"the cached conversion is damaged: {reason}; converting again")
        manifest_path(dest, step).unlink(missing_ok=True)
        for stale in dest.glob("*.tmp"):  # left by a process that was killed while converting
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest / f"{step}.{os.getpid()}.tmp"
        tmp.mkdir(parents=True)
        try:
            say(f"converting {what} (once) …")
            start = time.perf_counter()
            convert(tmp)
            sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
            for name in sizes:
                os.replace(tmp / name, dest / name)
            done = tmp / "manifest"
            done.write_text(json.dumps(sizes))
            os.replace(done, manifest_path(dest, step))
            say(f"converted {what} in {time.perf_counter() - start:.1f} s, into {dest}")
        finally:  # also on Ctrl-C: no half-written files are left behind, nor an empty folder
            shutil.rmtree(tmp, ignore_errors=True)
            if not any(dest.iterdir()):
                dest.rmdir()
