"""The prefix cache's changes published as vLLM's KV events, for routers that route by cached prefix.

    publisher = KVEventPublisher("tcp://127.0.0.1:5557", replay_endpoint="tcp://127.0.0.1:5558")
    engine.core.pool.events = publisher      # the pool calls stored / removed / cleared (a PrefixEvents)
    ...
    publisher.close()

The wire format is vLLM's (`vllm/distributed/kv_events.py`, its `ZmqEventPublisher`): a ZMQ PUB socket sends
multipart messages (topic, sequence number as 8 bytes big-endian, payload); the payload is msgpack of the
batch `[timestamp, [event, ...], data_parallel_rank]`. Each event is, as vLLM ≥ 0.2x publishes it (its
PR #42892), a map tagged by "type":

    {"type": "BlockStored", "block_hashes": [h, ...], "parent_block_hash": h | None, "token_ids": [...],
     "block_size": P, "lora_id": None, "medium": "GPU" | "CPU", "lora_name": None, "extra_keys": [None, ...],
     "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    {"type": "BlockRemoved", "block_hashes": [h, ...], "medium": ..., "group_idx": 0}
    {"type": "AllBlocksCleared"}

or, with `fmt="array"`, the positional tagged arrays of earlier vLLM (["BlockStored", hashes, parent, tokens,
block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind], ["BlockRemoved", hashes,
medium, group_idx], ["AllBlocksCleared"]) for consumers that read only those. A block hash is the low 64
bits of magicdec's chained SHA-256 (`magicdec.cache.blocks`) as an unsigned integer, as vLLM's default
(`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`); consumers use the published hashes (they are not vLLM's hash of
the tokens). `medium` is the tier the engine's KV cache lives in.

A replay ROUTER socket (optional) answers a subscriber that joined late: it sends the 8-byte start sequence
number and gets every buffered batch from there, each as (sequence, payload), then (-1, b"").

The engine's thread only appends events to a bounded list: a thread of the publisher's own batches what
accumulated, encodes, sends and buffers it. If the list overflows (the thread starved), what it held is
dropped and the next batch starts with AllBlocksCleared (a subscriber forgets what it may have missed
evictions of, rather than route to prefixes that are gone); the engine never waits for the publisher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import msgpack
import zmq

log = logging.getLogger("magicdec.server")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
HASH_MASK = (1 << 64) - 1
Format = Literal["map", "array"]


def external_hash(h: bytes) -> int:
    """A block's hash as published: its low 64 bits, unsigned (vLLM's `maybe_convert_block_hash`)."""
    return int.from_bytes(h, "big") & HASH_MASK


def binds(endpoint: str) -> bool:
    """vLLM's rule: a wildcard address (or ipc/inproc) is bound, any other address connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str | None, rank: int) -> str | None:
    """The endpoint of data-parallel rank `rank`: its TCP port + rank (vLLM's convention)."""
    if not endpoint or rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def local_endpoint(endpoint: str, host: str, wildcards: Sequence[str]) -> str:
    """The endpoint a wildcard (tcp://*:port) means for a server bound to `host`: every interface only when
    the server itself listens on every interface, loopback otherwise (the events carry prompts' tokens)."""
    if endpoint.startswith("tcp://*:") and host not in wildcards:
        return endpoint.replace("tcp://*:", "tcp://127.0.0.1:", 1)
    return endpoint


class KVEventPublisher:
    """A `PrefixEvents` listener that publishes vLLM's KV-event stream over ZMQ (see the module)."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
                 data_parallel_rank: int = 0, medium: str = "GPU", fmt: Format = "map", bind: bool | None = None,
                 buffer_steps: int = 10_000, max_pending: int = 100_000, hwm: int = 100_000) -> None:
        """`bind`: bind the PUB socket to `endpoint` (True) or connect to it (False); None: vLLM's rule
        (`binds`). The replay socket is always bound."""
        if fmt not in ("map", "array"):
            raise ValueError(f"the KV-event format must be 'map' or 'array', got {fmt!r}")
        self.topic, self.rank, self.medium, self.fmt = topic.encode(), data_parallel_rank, medium, fmt
        self.max_pending = max_pending
        self.pending: list[Any] = []  # events not batched yet (engine thread appends, publisher thread takes)
        self.resync = False  # the next batch starts with AllBlocksCleared (events were dropped)
        self.dropped = 0  # events dropped, over the publisher's life
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)  # (seq, payload) for replay
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.ctx = zmq.Context.instance()
        self.pub = self.ctx.socket(zmq.PUB)
        self.replay: zmq.Socket[bytes] | None = None
        try:
            self.pub.set_hwm(hwm)
            self.pub.setsockopt(zmq.LINGER, 0)
            try:
                (self.pub.bind if (binds(endpoint) if bind is None else bind) else self.pub.connect)(endpoint)
            except zmq.ZMQError as e:
                raise ValueError(f"--kv-events-endpoint {endpoint}: {e}") from None
            if replay_endpoint is not None:
                self.replay = self.ctx.socket(zmq.ROUTER)
                self.replay.setsockopt(zmq.LINGER, 0)
                try:
                    self.replay.bind(replay_endpoint)
                except zmq.ZMQError as e:
                    raise ValueError(f"--kv-events-replay-endpoint {replay_endpoint}: {e}") from None
        except BaseException:
            self._close_sockets()
            raise
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint = (self.replay.getsockopt_string(zmq.LAST_ENDPOINT) or replay_endpoint
                                if self.replay is not None else None)
        self.running = True
        self.thread = threading.Thread(target=self._run, name="magicdec-kv-events", daemon=True)
        self.thread.start()

    # ---- PrefixEvents (the engine's thread: append only) -----------------------------------------------
    def stored(self, hashes: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int],
               block_size: int) -> None:
        ext = [external_hash(h) for h in hashes]
        par = None if parent is None else external_hash(parent)
        if self.fmt == "map":
            event: Any = {"type": "BlockStored", "block_hashes": ext, "parent_block_hash": par,
                          "token_ids": list(token_ids), "block_size": block_size, "lora_id": None,
                          "medium": self.medium, "lora_name": None, "extra_keys": [None] * len(ext),
                          "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
        else:
            event = ["BlockStored", ext, par, list(token_ids), block_size, None, self.medium, None,
                     [None] * len(ext), 0, "full_attention"]
        self._add(event)

    def removed(self, hashes: Sequence[bytes]) -> None:
        ext = [external_hash(h) for h in hashes]
        self._add({"type": "BlockRemoved", "block_hashes": ext, "medium": self.medium, "group_idx": 0}
                  if self.fmt == "map" else ["BlockRemoved", ext, self.medium, 0])

    def cleared(self) -> None:
        self._add(self._cleared())

    def _cleared(self) -> Any:
        return {"type": "AllBlocksCleared"} if self.fmt == "map" else ["AllBlocksCleared"]

    def _add(self, event: Any) -> None:
        with self.lock:
            if len(self.pending) >= self.max_pending:  # the publisher fell behind: drop, then resync
                self.dropped += len(self.pending)
                self.pending.clear()
                self.resync = True
            self.pending.append(event)
        self.wake.set()

    # ---- the publisher's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self.wake.wait(0.05)
            self.wake.clear()
            try:
                self._serve_replay()
                self._publish()
            except Exception as e:  # (a publisher's failure must not stop the server)
                log.warning("KV events: %s", e)
            if not self.running:
                break

    def _publish(self) -> None:
        with self.lock:
            events, self.pending = self.pending, []
            resync, self.resync = self.resync, False
        if resync:
            log.warning("KV events: the publisher fell behind, %d events dropped: AllBlocksCleared sent",
                        self.dropped)
            events.insert(0, self._cleared())
        if not events:
            return
        payload = msgpack.packb([time.time(), events, self.rank], use_bin_type=True)
        seq, self.seq = self.seq, self.seq + 1
        self.pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        self.buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        while self.replay is not None and self.replay.poll(0):
            frames = self.replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("KV events: a replay request that is not (identity, '', 8-byte sequence): ignored")
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= first:
                    self.replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self.replay.send_multipart((client, b"", END_SEQ, b""))

    def close(self, timeout: float = 1.0) -> None:
        """Publish what is pending, stop the thread and close the sockets."""
        if not self.running:
            return
        self.running = False
        self.wake.set()
        self.thread.join(timeout)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.pub.close(linger=0)
        if self.replay is not None:
            self.replay.close(linger=0)
