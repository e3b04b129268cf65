"""`magicdec serve --data-parallel-size N`: N independent servers (replicas) of one model on one machine.

    magicdec serve --data-parallel-size 2 --port 8000 --kv-events-endpoint 'tcp://*:5557'
    # replica r: `magicdec serve … --port 8000+r --data-parallel-rank r`, KV events on port 5557+r,
    # CUDA_VISIBLE_DEVICES: its own share of the devices (none on a CPU machine)

Each replica is a `magicdec serve` process with the same flags, its port (and KV-event ports) offset by
its rank; a router in front of them (docs/deploy.md) spreads the requests. This process only launches
and supervises: SIGTERM or Ctrl-C is passed to every replica, which drains (new requests 503, running ones
finish within --shutdown-timeout) and exits; a replica that dies alone is reported and the others go on
serving (the router's health checks route around it). The exit status is the first non-zero one of the
replicas', 0 when every replica stopped cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from magicdec.server.kv_events import offset_endpoint


def device_groups(n: int, device: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each of `n` replicas (disjoint, equal shares of the visible devices), or
    None on a machine (or --device) without CUDA."""
    if device is not None and not device.startswith("cuda"):
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if device is not None:
            raise ValueError(f"--device {device}: no CUDA device is visible")
        return None
    if count < n:
        raise ValueError(f"--data-parallel-size {n}: only {count} CUDA devices are visible; one replica needs one")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")][:count] if visible else [str(i) for i in range(count)]
    per = count // n
    return [",".join(ids[r * per : (r + 1) * per]) for r in range(n)]


def replica_command(args: argparse.Namespace, rank: int) -> list[str]:
    """Replica `rank`'s command: the same flags, then those that make it rank `rank` (argparse keeps the last)."""
    extra = ["--data-parallel-size", "1", "--data-parallel-rank", str(rank), "--port", str(args.port + rank)]
    if args.device is not None and args.device.startswith("cuda"):
        extra += ["--device", "cuda"]  # (its devices are renumbered from 0 by CUDA_VISIBLE_DEVICES)
    for flag, endpoint in (("--kv-events-endpoint", args.kv_events_endpoint),
                           ("--kv-events-replay-endpoint", args.kv_events_replay_endpoint)):
        if endpoint is not None:
            extra += [flag, str(offset_endpoint(endpoint, rank))]
    return [sys.executable, "-m", "magicdec", *getattr(args, "argv", sys.argv[1:]), *extra]


def run_replicas(args: argparse.Namespace) -> int:
    n = args.data_parallel_size
    if not 1 <= args.port <= 65536 - n:
        raise ValueError(f"--data-parallel-size {n} serves on ports --port … --port+{n - 1}: give a --port in "
                         f"1 … {65536 - n}")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--data-parallel-size launches replicas itself: run it without torchrun (docs/deploy.md "
                         "shows tensor-parallel replicas)")
    groups = device_groups(n, args.device)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(n):
            env = dict(os.environ)
            if groups is not None:
                env["CUDA_VISIBLE_DEVICES"] = groups[rank]
            procs.append(subprocess.Popen(replica_command(args, rank), env=env))
        print(f"magicdec serve: {n} replicas on http://{args.host}:{args.port} … :{args.port + n - 1}"
              f"{' (devices ' + ' | '.join(groups) + ')' if groups else ''}", file=sys.stderr, flush=True)
        status: dict[int, int] = {}
        while len(status) < n:
            for rank, p in enumerate(procs):
                code = p.poll()
                if code is not None and rank not in status:
                    status[rank] = code
                    if code != 0 and not stopping:
                        print(f"magicdec serve: replica {rank} (port {args.port + rank}) exited with {code}; "
                              f"{n - len(status)} still serving", file=sys.stderr, flush=True)
            time.sleep(0.2)
    finally:
        for p in procs:  # (an error in this process: no replica outlives it)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [c if c >= 0 else 128 - c for c in status.values()]  # (killed by signal s: 128 + s, as a shell says)
    return next((c for c in codes if c != 0), 0)
