"""Replicas behind a router (docs/deploy.md, as run there): two `magicdec serve` replicas of the tiny model
(`--data-parallel-size 2`) behind the SGLang Model Gateway on 127.0.0.1, round-robin and cache-aware.

The same 40 requests of 8 shared long prefixes go through each router, the replicas' prefix caches reset
between the two runs (POST /reset_prefix_cache): 5 rounds over the 8 prefixes, each round's order the last
one's turned by one (documents visited in turn, as an agent or a batch job does), a round's 8 sent 10 ms
apart from one event loop, so that the router sees them in the test's order, all running. Every request
succeeds and its greedy text is offline generation's.
With each replica's KV cache holding 6 prompts' blocks, cache-aware routing keeps each prefix on the replica
that has it (4 or 5 prefixes each), while round-robin sends it to the other replica than last time, and 2
rounds later to one that has served 7 other prefixes since: the hit rate is at least twice round-robin's, and
at least 60%. (Prefixes sent at random to two replicas would land where they are cached about half the time:
2× only in expectation.) Then the 8 prefixes go through cache-aware routing 8 at once, shuffled, as a loaded
server sees them. A KV-event subscriber on each replica sees BlockStored for every prompt block cached, with
hashes that chain (checked against the prefix cache's SHA-256 chain), and BlockRemoved only for blocks stored
before; a late subscriber's replay gives the same batches. Then one replica is killed while requests run: the
later requests all succeed on the other, none hangs, and only requests in flight at the kill may fail.
Unit tests of the pool's PrefixEvents and the publisher open it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgpack
import psutil
import pytest
import zmq

from app_server import MODEL, AppServer, chat_checkpoint
from magicdec import LLM, SamplingParams
from magicdec.cache.blocks import BlockPool, chain_hashes
from magicdec.server.kv_events import KVEventPublisher, external_hash
from magicdec.server.protocol import ChatRequest, CompletionRequest
from magicdec.serving import Engine
from router_fleet import Fleet, Router, Subscriber, replay

P = 64  # tokens per block (the server's)
PREFIX_WORDS, SUFFIX_WORDS, MAX_TOKENS = 383, 20, 8  # after the chat template's 'user': 6 shared blocks
ENGINE = ["--num-blocks", "36", "--prefill-chunk", "64", "--max-model-len", "1024", "--max-num-batched-tokens", "512"]


def workload(seed: int, turned: bool = False) -> list[str]:
    """40 prompts: 5 rounds over 8 prefixes, each prompt with a suffix of its own; each round in a shuffled
    order, or (`turned`) in the order of the round before turned by one."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3, 384)]
    prefixes = [" ".join(rng.choices(words, k=PREFIX_WORDS)) for _ in range(8)]
    out = []
    for r in range(5):
        for p in ([(j + r) % 8 for j in range(8)] if turned else rng.sample(range(8), 8)):
            out.append(prefixes[p] + " " + " ".join(rng.choices(words, k=SUFFIX_WORDS)))
    return out


# ---- the pool's listener and the publisher, in process -----------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def stored(self, hashes: Any, parent: Any, token_ids: Any, block_size: int) -> None:
        self.log.append(("stored", list(hashes), parent, list(token_ids), block_size))

    def removed(self, hashes: Any) -> None:
        self.log.append(("removed", list(hashes)))

    def cleared(self) -> None:
        self.log.append(("cleared",))


def test_pool_tells_its_listener() -> None:
    pool, rec = BlockPool(4, 2), Recorder()
    pool.events = rec
    tokens = [5, 6, 7, 8, 9, 10]
    hashes = chain_hashes(tokens, 2)
    blocks = pool.allocate(3)
    pool.register_chain(blocks[:1], hashes[:1], None, tokens[:2])
    pool.register_chain(blocks[1:], hashes[1:], hashes[0], tokens[2:])
    assert rec.log == [("stored", hashes[:1], None, [5, 6], 2), ("stored", hashes[1:], hashes[0], [7, 8, 9, 10], 2)]
    pool.register_chain(blocks[1:], hashes[1:], hashes[0], tokens[2:])  # known already: no event
    assert len(rec.log) == 2
    pool.release(blocks)
    pool.allocate(2)  # the free block, then the least recently freed cached one (the prefix's tail)
    assert rec.log[2:] == [("removed", [hashes[2]])]
    pool.clear_prefix_cache()
    assert rec.log[3:] == [("cleared",)]


@pytest.mark.parametrize("fmt", ["map", "array"])
def test_publisher_wire_format_and_replay(fmt: str) -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv", data_parallel_rank=3, fmt=fmt)
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(pub.endpoint)
        h = chain_hashes(list(range(8)), 4)
        while not sub.poll(100):  # (a PUB socket drops what it sends before the subscription arrives)
            pub.cleared()
        while sub.poll(300):
            sub.recv_multipart()
        publish = pub._publish
        pub._publish = lambda: None  # type: ignore[method-assign]  # (both events in one batch)
        pub.stored(h, None, list(range(8)), 4)
        pub.removed(h[1:])
        pub._publish = publish  # type: ignore[method-assign]
        topic, seq, payload = sub.recv_multipart()
        ts, events, rank = msgpack.unpackb(payload)
        assert topic == b"kv" and len(seq) == 8 and isinstance(ts, float) and rank == 3
        stored, removed = events
        ints = [int.from_bytes(x[-8:], "big") for x in h]
        if fmt == "map":
            assert stored == {"type": "BlockStored", "block_hashes": ints, "parent_block_hash": None,
                              "token_ids": list(range(8)), "block_size": 4, "lora_id": None, "medium": "GPU",
                              "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
                              "kv_cache_spec_kind": "full_attention"}
            assert removed == {"type": "BlockRemoved", "block_hashes": ints[1:], "medium": "GPU", "group_idx": 0}
        else:
            assert stored[:7] == ["BlockStored", ints, None, list(range(8)), 4, None, "GPU"]
            assert removed[:3] == ["BlockRemoved", ints[1:], "GPU"]
        last = int.from_bytes(seq, "big")
        replayed = replay(pub.replay_endpoint or "", last)
        assert replayed == [(last, events)]
    finally:
        sub.close(linger=0)
        pub.close()


def test_publisher_drops_and_resyncs_instead_of_blocking() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", max_pending=4)
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.endpoint)
        while not sub.poll(100):
            pub.removed([])
        while sub.poll(300):
            sub.recv_multipart()
        publish = pub._publish
        pub._publish = lambda: None  # type: ignore[method-assign]  # the publisher's thread falls behind
        h = chain_hashes(list(range(4)), 4)
        for _ in range(10):  # the engine's appends never wait: the oldest are dropped
            pub.removed(h)
        assert pub.resync and pub.dropped == 8 and len(pub.pending) == 2
        pub._publish = publish  # type: ignore[method-assign]
        events = msgpack.unpackb(sub.recv_multipart()[2])[1]
        assert [e["type"] for e in events] == ["AllBlocksCleared", "BlockRemoved", "BlockRemoved"]
    finally:
        sub.close(linger=0)
        pub.close()


def test_what_a_router_forwards_is_accepted() -> None:
    forwarded = {"skip_special_tokens": True, "no_stop_trim": False, "return_hidden_states": False}
    assert CompletionRequest(prompt="a", **forwarded).unsupported() == []
    chat = ChatRequest(messages=[], continue_final_message=False, separate_reasoning=True, stream_reasoning=True,
                       include_reasoning=True, **forwarded)
    assert chat.unsupported() == []
    # skip_special_tokens and no_stop_trim (vLLM's include_stop_str_in_output) are served at either value
    assert CompletionRequest(prompt="a", skip_special_tokens=False, no_stop_trim=True).unsupported() == []
    assert CompletionRequest(prompt="a", return_hidden_states=True).unsupported() == ["return_hidden_states"]
    assert ChatRequest(messages=[], continue_final_message=True).unsupported() == ["continue_final_message"]


def test_reset_prefix_cache_is_a_dev_endpoint(chat_dir: Path) -> None:
    """POST /reset_prefix_cache (with --dev-endpoints only): the prompt served from the cache is computed again."""
    def load() -> Engine:
        return Engine(chat_dir, device="cpu", quiet=True, num_blocks=16, prefill_chunk=64)

    body = {"model": MODEL, "prompt": " ".join(f"w{i}" for i in range(3, 203)), "max_tokens": 2, "temperature": 0}
    with AppServer(load) as plain:
        assert plain.post("/reset_prefix_cache", {}).status_code == 404
    with AppServer(load, dev_endpoints=True) as dev:
        def cached() -> int:
            r = dev.post("/v1/completions", body)
            r.raise_for_status()
            return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        first, second = cached(), cached()
        assert dev.post("/reset_prefix_cache", {}).status_code == 200
        assert (first, second, cached()) == (0, 192, 0)


# ---- the fleet ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def fleet(chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(chat_dir, 2, logs / "fleet.log", *ENGINE, "--dev-endpoints")
    try:
        fleet.wait_ready()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def offline(chat_dir: Path) -> LLM:
    return LLM(chat_dir, device="cpu", prefill_chunk=64)


def chat_ids(llm: LLM, texts: list[str]) -> list[list[int]]:
    """The prompts the server makes of one user message each (its chat template, no added special tokens)."""
    tok = llm.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], True), add_special_tokens=False)
            for t in texts]


def run(router: Router, prompts: list[str], every: float = 0.0, at_once: int = 8) -> list[dict[str, Any]]:
    """The prompts `at_once` at a time (a round), each round's sent `every` seconds apart from one event loop (so
    that the router sees them in this order, all running), or all at once (0: in any order)."""

    async def rounds() -> list[dict[str, Any]]:
        answers = []
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=at_once)) as client:
            for i in range(0, len(prompts), at_once):
                sent = []
                for p in prompts[i : i + at_once]:
                    body = {"model": router.model, "messages": [{"role": "user", "content": p}],
                            "max_tokens": MAX_TOKENS, "temperature": 0}
                    sent.append(asyncio.create_task(client.post(f"{router.url}/v1/chat/completions", json=body)))
                    await asyncio.sleep(every)
                for r in await asyncio.gather(*sent):
                    r.raise_for_status()
                    answers.append(r.json())
        return answers

    return asyncio.run(rounds())


def reset_prefix_caches(fleet: Fleet) -> None:
    for url in fleet.urls:
        httpx.post(f"{url}/reset_prefix_cache", timeout=30).raise_for_status()


def hit_rate(answers: list[dict[str, Any]]) -> float:
    cached = sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    return cached / sum(a["usage"]["prompt_tokens"] for a in answers)


def test_cache_aware_routing_events_and_a_replica_killed(fleet: Fleet, offline: LLM,
                                                         tmp_path: Path) -> None:
    subs = [Subscriber(fleet.event_endpoint(r)) for r in range(2)]
    routers = {policy: Router(fleet.urls, policy, tmp_path / f"{policy}.log") for policy in ("round_robin",
                                                                                          "cache_aware")}
    try:
        for router in routers.values():
            router.wait_ready()
        time.sleep(0.5)  # (the subscriptions reach the publishers)
        answers: dict[str, list[dict[str, Any]]] = {}
        same = workload(1, turned=True)
        for policy, router in routers.items():
            reset_prefix_caches(fleet)
            answers[policy] = run(router, same, every=0.01)
        rates = {policy: hit_rate(a) for policy, a in answers.items()}
        shuffled = workload(2)
        answers["loaded"] = run(routers["cache_aware"], shuffled)
        loaded = hit_rate(answers["loaded"])
        print(f"prefix-cache hit rate on the same requests: {rates}; cache-aware, 8 at once, shuffled: {loaded:.3f}")
        assert rates["cache_aware"] >= max(0.6, 2 * rates["round_robin"]), rates
        assert loaded >= 0.5, loaded  # (8 at once: the router may balance a few prefixes away from their replica)

        # greedy text is offline generation's
        everything = same + same + shuffled
        expected = offline.generate(chat_ids(offline, everything), SamplingParams(max_new_tokens=MAX_TOKENS))
        got = [a["choices"][0]["message"]["content"] for policy in answers for a in answers[policy]]
        assert got == [o.text for o in expected.outputs]

        # KV events: every cached prompt block stored, hashes chaining, removals of stored blocks only
        time.sleep(0.3)  # (the publishers send within 50 ms)
        stored_all: set[int] = set()
        for rank, sub in enumerate(subs):
            seen: dict[int, int | None] = {}  # hash → parent, while stored
            removed = 0
            for e in sub.events:
                if e["type"] == "BlockStored":
                    assert e["block_size"] == P and len(e["token_ids"]) == P * len(e["block_hashes"])
                    parent = e["parent_block_hash"]
                    for h in e["block_hashes"]:
                        seen[h] = parent
                        parent = h
                elif e["type"] == "AllBlocksCleared":  # (the resets between the policies)
                    seen.clear()
                elif e["type"] == "BlockRemoved":
                    for h in e["block_hashes"]:
                        assert h in seen, "BlockRemoved for a block never stored"
                        del seen[h]
                    removed += len(e["block_hashes"])
            assert removed > 0  # 8 prefixes of 6 blocks do not fit 36 blocks: evictions
            stored_all |= {h for e in sub.events if e["type"] == "BlockStored" for h in e["block_hashes"]}
            # a late subscriber's replay gives the same batches
            assert replay(fleet.replay_endpoint(rank)) == [(s, ev) for s, ev, _ in sub.batches]
        chains = {}
        for ids in chat_ids(offline, everything):
            hashes = [external_hash(h) for h in chain_hashes(ids[: (len(ids) - 1) // P * P], P)]
            assert set(hashes) <= stored_all
            chains.update({h: (hashes[i - 1] if i else None) for i, h in enumerate(hashes)})
        for sub in subs:  # each stored block's parent is the one before it in its prompt
            for e in sub.events:
                if e["type"] == "BlockStored":
                    parents = [e["parent_block_hash"], *e["block_hashes"][:-1]]
                    assert [chains[h] for h in e["block_hashes"]] == parents

        # one replica killed while requests run: later ones go to the other, none hangs
        router = routers["cache_aware"]
        victim = fleet.replica_pid(1)
        lock, state = threading.Lock(), {"running": 0, "done": 0}

        def send(prompt: str) -> bool:
            with lock:
                state["running"] += 1
            try:
                router.chat(prompt, 32, timeout=60, ignore_eos=True)
                return True
            except httpx.HTTPStatusError:
                return False
            finally:
                with lock:
                    state["running"] -= 1
                    state["done"] += 1

        during = workload(3)[:16]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, p) for p in during]
            while state["done"] < 4:
                time.sleep(0.01)
            with lock:  # (no request starts or ends while the replica is killed)
                os.kill(victim, signal.SIGKILL)
                in_flight = state["running"]
            results = [f.result(timeout=120) for f in futures]
        lost = results.count(False)
        after = [send(p) for p in workload(4)[:8]]
        print(f"killed replica 1: {lost} of {len(during)} requests lost, {in_flight} were in flight at the kill")
        assert lost <= in_flight
        assert all(after), after
        # SIGTERM to the launcher: the replica left drains and exits 0; the launcher reports the killed one
        assert fleet.stop() == 128 + signal.SIGKILL
        assert fleet.log.read_text().count("Finished server process") == 1
    finally:
        for router in routers.values():
            router.stop()
        for sub in subs:
            sub.close()


def test_a_draining_replica_loses_no_request(chat_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to one replica behind the router while requests run (a rolling restart): it finishes what it
    runs and refuses new requests with 503 until it exits, the router sends them to the other; none is lost."""
    fleet = Fleet(chat_dir, 2, tmp_path / "fleet.log", *ENGINE)
    router: Router | None = None
    try:
        fleet.wait_ready()
        router = Router(fleet.urls, "round_robin", tmp_path / "router.log")
        router.wait_ready()
        lock, done = threading.Lock(), [0]

        def send(prompt: str) -> str:
            assert router is not None
            try:
                return router.chat(prompt, 64, timeout=60, ignore_eos=True)["choices"][0]["finish_reason"]
            except httpx.HTTPStatusError as e:
                return str(e)
            finally:
                with lock:
                    done[0] += 1

        drained = fleet.replica_pid(1)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, p) for p in workload(5)[:24]]
            while done[0] < 4:
                time.sleep(0.01)
            os.kill(drained, signal.SIGTERM)
            during = [f.result(timeout=120) for f in futures]
        after = [send(p) for p in workload(6)[:6]]
        assert during + after == ["length"] * 30, during + after
        try:  # it exits once drained (the launcher reaps it)
            psutil.Process(drained).wait(30)
        except psutil.NoSuchProcess:
            pass
        assert "Finished server process" in fleet.log.read_text()
    finally:
        if router is not None:
            router.stop()
        fleet.stop()
