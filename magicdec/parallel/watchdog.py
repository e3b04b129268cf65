"""Failing together under torchrun: a rank that fails tells the others, and every rank ends within seconds.

Ranks meet in collectives, so one rank's exception (a memory check, a bad prompt, a bug) would leave the
others waiting in their next all-reduce until the process group's timeout, or forever when the failing
process itself does not end (a process group's teardown can wait on its peers).
`start_watchdog` (called by `init_from_env`) starts a daemon thread on each rank that polls the process
group's store. `end_failed_rank` (called by the CLI, and by the exception hook `start_watchdog` installs
for exceptions nobody catches) writes the failing rank's one-line error there and ends its process. The
watchdog of every other rank then prints "rank R failed: <error>" and ends its process with status 1
(`os._exit`), even while its main thread is blocked inside a gloo or NCCL collective.

Every rank that ends (failed, stopped, or done) counts itself in the store. The rank that may host the
store (rank 0, unless torchrun's agent hosts it) waits for that count to reach the world size before it
leaves, and a failing rank waits for it too, so every rank reads its peers' news before the store goes.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

import torch.distributed as dist

FIRST = "magicdec/first_failure"  # "rank:message" of the first rank to fail
FAILURES = "magicdec/failures"  # how many ranks have failed
DOWN = "magicdec/down"  # how many ranks have ended or are ending
POLL_S = 0.25  # how often a watchdog reads the store
WAIT_S = 5.0  # how long a rank waits for the others to end before it leaves anyway
EXIT_STATUS = 1


@dataclass(slots=True)
class Watchdog:
    """One rank's view of the job's failures. `store` is the main thread's connection to the store,
    `poll` the watchdog thread's own (a store client is not shared between threads)."""

    store: dist.Store
    poll: dist.Store
    rank: int
    world: int
    hosts_store: bool
    failing: threading.Event = field(default_factory=threading.Event)  # this rank failed and says so itself
    stopping: threading.Event = field(default_factory=threading.Event)  # a peer failed: the watchdog ends us
    done: threading.Event = field(default_factory=threading.Event)  # this process is exiting normally
    thread: threading.Thread | None = None


_watchdog: Watchdog | None = None


def start_watchdog() -> Watchdog:
    """Start this process's watchdog (once) over the default process group's store; make an uncaught
    exception end the rank through `end_failed_rank`, and a normal exit count the rank down."""
    global _watchdog
    if _watchdog is not None:
        return _watchdog
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    _watchdog = w = Watchdog(store.clone(), store.clone(), rank, dist.get_world_size(), hosts)
    w.thread = threading.Thread(target=_watch, args=(w,), name="magicdec-watchdog", daemon=True)
    w.thread.start()
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if not w.stopping.is_set():  # else the error of a collective the failed peer left: not worth saying
            previous(kind, error, tb)
        end_failed_rank(error, EXIT_STATUS)

    sys.excepthook = hook
    atexit.register(_finish, w)
    return w


def one_line(error: BaseException | str) -> str:
    """`error` as one line: its type and the first line of its message."""
    text = str(error)
    if not isinstance(error, str):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return (text.strip().splitlines() or [""])[0][:500]


def end_failed_rank(error: BaseException | str, status: int) -> None:
    """In a process group with a watchdog: publish `error` as this rank's failure (unless a peer failed
    first), wait until the other ranks have read it, then end this process with `status` without its
    teardown (which may wait on the others). Returns only when no watchdog runs."""
    w = _watchdog
    if w is None:
        return
    if not w.stopping.is_set() and not w.failing.is_set():
        w.failing.set()  # this rank says its own error: its watchdog stands down
        try:
            if w.store.add(FAILURES, 1) == 1:
                w.store.set(FIRST, f"{w.rank}:{one_line(error)}")
            _count_down(w, w.store, wait=True)
        except Exception:  # the store is gone (its host exited): nobody is left to tell
            pass
    if w.stopping.is_set():
        time.sleep(60)  # a peer failed first: the watchdog is ending this process with that peer's error
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing to flush
            pass
    os._exit(status)


def _count_down(w: Watchdog, store: dist.Store, wait: bool) -> None:
    """Count this rank as ending; with `wait`, or when this rank may host the store, wait (up to WAIT_S)
    until every rank has, then (the host) a moment more, so that no rank is left polling a closed store."""
    n = store.add(DOWN, 1)
    deadline = time.monotonic() + WAIT_S
    while (wait or w.hosts_store) and n < w.world and time.monotonic() < deadline:
        time.sleep(0.05)
        n = store.add(DOWN, 0)
    if w.hosts_store:
        time.sleep(0.2)


def _finish(w: Watchdog) -> None:
    """At a normal exit: stop the watchdog thread (before the interpreter stops its threads mid-call) and
    count this rank down."""
    w.done.set()
    if w.thread is not None:
        w.thread.join(timeout=2 * POLL_S)
    if not (w.failing.is_set() or w.stopping.is_set()):
        try:
            _count_down(w, w.store, wait=False)
        except Exception:  # the store is gone: the job is over
            pass


def _watch(w: Watchdog) -> None:
    """Poll the store until a peer's failure appears, then stop this rank."""
    while not (w.failing.is_set() or w.done.is_set()):
        try:
            first = w.poll.get(FIRST).decode() if w.poll.check([FIRST]) else None
        except Exception:  # the store is gone: the job is over (its host has exited)
            return
        if first is not None:
            rank, _, message = first.partition(":")
            if int(rank) == w.rank or w.failing.is_set():
                return
            _stop(w, int(rank), message)
        w.done.wait(POLL_S)


def _stop(w: Watchdog, rank: int, message: str) -> None:
    """Say that `rank` failed and end this process, after counting it down for the failing rank."""
    w.stopping.set()
    prefix = "" if w.rank == 0 else f"[rank {w.rank}] "
    print(f"{prefix}magicdec: rank {rank} failed: {message}", file=sys.stderr, flush=True)
    try:
        _count_down(w, w.poll, wait=False)  # the main thread may be inside a call on its own connection
    finally:
        os._exit(EXIT_STATUS)
