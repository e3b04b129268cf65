"""Replicas behind a router, as docs/deploy.md runs them: `magicdec serve --data-parallel-size N` (one launcher,
N server processes on consecutive ports, KV events on consecutive ports) and the SGLang Model Gateway
(`sglang-router`, from PyPI) in front, every process on 127.0.0.1; and a KV-event subscriber written from
vLLM's description of the stream (ZMQ SUB, msgpack), with its replay socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import psutil
import zmq

from conftest import free_port


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not healthy within {timeout} s:\n{log.read_text()[-3000:]}")


def free_ports(n: int) -> int:
    """A first port of `n` consecutive free ones (checked when taken, not reserved)."""
    while True:
        first = free_port()
        if first + n < 65536 and all(port_free(first + i) for i in range(1, n)):
            return first


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Fleet:
    """`magicdec serve --data-parallel-size n` over `model`, its output in `log`."""

    def __init__(self, model: Path, n: int, log: Path, *flags: str) -> None:
        self.n, self.log = n, log
        self.port, self.events = free_ports(n), free_ports(2 * n)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "magicdec", "serve", "--model", str(model), "--device", "cpu",
                   "--data-parallel-size", str(n), "--port", str(self.port), "--no-access-log",
                   "--kv-events-endpoint", f"tcp://*:{self.events}",
                   "--kv-events-replay-endpoint", f"tcp://*:{self.events + n}", *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.urls = [f"http://127.0.0.1:{self.port + r}" for r in range(n)]

    def wait_ready(self) -> None:
        for url in self.urls:
            wait_healthy(url, self.proc, self.log)

    def replica_pid(self, rank: int) -> int:
        """The pid of replica `rank` (the launcher's child serving port + rank)."""
        for child in psutil.Process(self.proc.pid).children():
            if f"{self.port + rank}" in child.cmdline()[-5:]:
                return child.pid
        raise LookupError(f"no replica on port {self.port + rank}")

    def event_endpoint(self, rank: int) -> str:
        return f"tcp://127.0.0.1:{self.events + rank}"

    def replay_endpoint(self, rank: int) -> str:
        return f"tcp://127.0.0.1:{self.events + self.n + rank}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


class Router:
    """The SGLang Model Gateway (`python -m sglang_router.launch_router`) over `workers` with `policy`."""

    def __init__(self, workers: list[str], policy: str, log: Path) -> None:
        self.port, self.log = free_port(), log
        self.model = httpx.get(f"{workers[0]}/v1/models", timeout=10).json()["data"][0]["id"]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                   str(self.port), "--policy", policy, "--worker-urls", *workers,
                   "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                   "--worker-startup-check-interval", "1", "--log-level", "warn",
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ready once a request goes through to a worker
            if self.proc.poll() is not None:
                raise RuntimeError(f"the router exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=5)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the router was not ready within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def chat(self, text: str, max_tokens: int, timeout: float = 60, **extra: Any) -> dict[str, Any]:
        """A greedy chat completion of one user message (sglang-router 0.3 routes chat requests by their text,
        not completions requests)."""
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=timeout,
                       json={"model": self.model, "messages": [{"role": "user", "content": text}],
                             "max_tokens": max_tokens, "temperature": 0, **extra})
        if r.is_error:
            raise httpx.HTTPStatusError(f"{r.status_code}: {r.text[:500]}", request=r.request, response=r)
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Subscriber:
    """A KV-event subscriber on one replica's PUB socket (a thread collecting every batch):
    frames (topic, 8-byte big-endian sequence, msgpack [timestamp, events, data_parallel_rank])."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.batches: list[tuple[int, list[Any], int]] = []  # (seq, events, rank)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            if self.sock.poll(50):
                topic, seq, payload = self.sock.recv_multipart()
                ts, events, rank = msgpack.unpackb(payload)
                assert isinstance(ts, float)
                self.batches.append((int.from_bytes(seq, "big"), events, rank))

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close(linger=0)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for _, events, _ in self.batches for e in events]


def replay(endpoint: str, start: int = 0, timeout_ms: int = 10_000) -> list[tuple[int, list[Any]]]:
    """Ask the replay socket for every buffered batch from `start`: (seq, events) until the (-1, b"") end."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            if not sock.poll(timeout_ms):
                raise TimeoutError(f"{endpoint}: no replay within {timeout_ms} ms")
            _, seq, payload = sock.recv_multipart()
            number = int.from_bytes(seq, "big", signed=True)
            if number == -1:
                return out
            out.append((number, msgpack.unpackb(payload)[1]))
    finally:
        sock.close(linger=0)
