"""`magicdec serve`: an OpenAI-compatible server (completions, chat completions, models, metrics).

    magicdec serve --spec self --budget 512 --gamma auto
    magicdec serve --model path/to/Llama-3.1-8B --host 0.0.0.0 --port 8000 --api-key "$KEY"

The server binds its address first (a bad --host or a busy --port is one line, before anything loads), then
listens at once; the model loads behind it (GET /health: 503 while loading, 200 when ready).
SIGTERM (or Ctrl-C): new requests get 503, running ones finish; after a SIGTERM the server listens until none
has arrived for 2 s (a router sees it leave). All within --shutdown-timeout seconds,
then they are aborted, and the process exits 0; stopped while the model still loads, it exits at once.
An empty --api-key (or $MAGICDEC_API_KEY) is refused rather than taken as "no authentication"; listening
on every interface (0.0.0.0, ::) without a key is allowed, with a warning.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from magicdec.cli.args import add_spec_flags, fit_budget, parse_count, parse_size, spec_from_args
from magicdec.engine.scheduler import SchedulerConfig
from magicdec.llm import LLM
from magicdec.loading import builtin_model_path, resolve_device
from magicdec.parallel.tp import init_from_env

if TYPE_CHECKING:
    from magicdec.server.kv_events import KVEventPublisher


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description="An OpenAI-compatible server: POST /v1/completions, "
                                          "/v1/chat/completions, /tokenize, /detokenize; GET /v1/models, "
                                          "/health, /metrics (Prometheus, vLLM's metric names).")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face checkpoint directory or .gguf file (default: built-in SmolLM2-135M)")
    m.add_argument("--served-model-name", help="the model name clients send (default: the model's file or "
                                               "directory name)")
    m.add_argument("--dtype", help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    m.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    h.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    h.add_argument("--api-key", default=os.environ.get("MAGICDEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$MAGICDEC_API_KEY, or none)")
    h.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait beyond the running batch (--max-num-seqs); more get 503 with "
                        "Retry-After (default 64)")
    h.add_argument("--max-body-bytes", type=parse_size, default=1 << 20, help="largest request body (default 1MiB)")
    h.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish (default 30)")
    h.add_argument("--log-interval", type=float, default=10.0, help="seconds between throughput lines (default 10)")
    h.add_argument("--no-access-log", action="store_true", help="no line per HTTP request")
    h.add_argument("--dev-endpoints", action="store_true",
                   help="serve POST /reset_prefix_cache (as vLLM's VLLM_SERVER_DEV_MODE; off: 404)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=parse_count, default=8, help="requests in the running batch (default 8)")
    e.add_argument("--max-num-batched-tokens", type=parse_count, default=1024,
                   help="tokens per step: decoding rounds and prefill chunks (default 1024)")
    e.add_argument("--prefill-chunk", type=parse_count, default=512, help="prompt tokens per prefill chunk")
    e.add_argument("--num-blocks", type=parse_count, help="KV-cache blocks of 64 tokens (default: from memory)")
    e.add_argument("--kv-cache-memory", type=parse_size, help="bytes for the KV cache, e.g. 4GiB")
    e.add_argument("--max-model-len", type=parse_count, help="longest prompt + output (default: the model's)")
    e.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    e.add_argument("--keep-windows", action="store_true",
                   help="on a model with sliding and global layers, keep every block of the sliding layers (their "
                        "KV then grows with the context) so the prefix cache works (implied by "
                        "--kv-events-endpoint); by default a sliding layer holds its window only, without prefix "
                        "caching")
    k = p.add_argument_group("KV events and replicas (docs/deploy.md)")
    k.add_argument("--kv-events-endpoint", metavar="ENDPOINT",
                   help="publish the prefix cache's changes as vLLM's KV events (ZMQ PUB, msgpack), e.g. "
                        "tcp://*:5557: a wildcard binds 127.0.0.1 unless --host listens on every interface; "
                        "any other address is connected to (vLLM's rule)")
    k.add_argument("--kv-events-replay-endpoint", metavar="ENDPOINT",
                   help="a ROUTER socket that replays buffered event batches to late subscribers, e.g. tcp://*:5558")
    k.add_argument("--kv-events-topic", default="", help="the ZMQ topic of the events (default: none, vLLM's)")
    k.add_argument("--kv-events-format", choices=("map", "array"), default="map",
                   help="events as tagged maps (vLLM ≥ PR 42892, default) or positional tagged arrays (earlier vLLM)")
    k.add_argument("--data-parallel-size", type=parse_count, default=1,
                   help="start N servers on ports --port … --port+N-1 (one device each where there are CUDA "
                        "devices), each with its KV-event ports offset by its rank (default 1)")
    k.add_argument("--data-parallel-rank", type=int, default=0,
                   help="the rank this server publishes in its KV events (set by --data-parallel-size)")
    add_spec_flags(p)
    p.set_defaults(func=run)


def default_model_name(model: str | None) -> str:
    """A .gguf file's stem, or a checkpoint directory's name (the built-in model's file stem)."""
    path = Path(model).expanduser() if model else builtin_model_path()
    path = path.resolve() if str(path) in (".", "..") else path
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from magicdec.server import ServerConfig, create_app
    from magicdec.serving import Engine

    if args.data_parallel_size > 1:
        from magicdec.cli.replicas import run_replicas

        return run_replicas(args)
    # checked before the server starts, so that a typo costs no wait
    spec = spec_from_args(args)
    SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.prefill_chunk,
                    spec.gamma_bound if spec.enabled else 0)
    if args.model and not Path(args.model).expanduser().exists():
        raise ValueError(f"--model {args.model}: no such file or directory")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0 … 65535, got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be ≥ 0, got {args.max_queue}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be ≥ 0 seconds, got {args.shutdown_timeout}")
    api_key = checked_api_key(args.api_key)
    name = args.served_model_name or default_model_name(args.model)
    device_type = resolve_device(args.device).type
    leader = int(os.environ.get("RANK", "0")) == 0
    sockets = listen(args.host, args.port) if leader else []  # only rank 0 answers HTTP
    if leader and api_key is None and args.host in WILDCARDS:
        print(f"magicdec serve: warning: listening on every interface ({args.host or 'all'}) without --api-key: "
              "anyone who reaches this machine can use the server", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    events = kv_event_publisher(args, device_type) if leader else None

    # under torchrun: every rank loads its shard; rank 0 answers HTTP and schedules, broadcasting each step's
    # new and aborted requests; the other ranks follow its steps (a rank that fails ends all: the watchdog)
    tp = init_from_env(device_type)

    def load() -> Engine:
        llm = LLM(args.model, dtype=args.dtype, device=args.device if tp is None else device_type,
                  prefill_chunk=args.prefill_chunk, tp=tp)
        context = min(args.max_model_len or llm.config.max_position_embeddings, llm.config.max_position_embeddings)
        fitted = fit_budget(spec, context, "serve")
        engine = Engine(llm=llm, spec=fitted if spec.enabled else None, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                      num_blocks=args.num_blocks, kv_cache_memory=args.kv_cache_memory,
                      enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len,
                      release_windows=not (args.keep_windows or args.kv_events_endpoint),
                      quiet=tp is not None and tp.rank != 0)
        engine.core.pool.events = events
        return engine

    if tp is not None and tp.rank != 0:
        from magicdec.server.runner import follow

        for s in (signal.SIGINT, signal.SIGTERM):  # rank 0 drains and tells this rank when to stop
            signal.signal(s, signal.SIG_IGN)
        follow(load())
        return 0

    failure: list[BaseException] = []
    config = ServerConfig(name, api_key=api_key, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          log_interval=args.log_interval, dev_endpoints=args.dev_endpoints)
    app = create_app(config, load)
    server = make_server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   access_log=not args.no_access_log,
                                   timeout_graceful_shutdown=args.shutdown_timeout),
                         app.state.magicdec)

    def fatal(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    config.on_fatal = fatal
    bound = sockets[0].getsockname()
    logging.getLogger("magicdec.server").info("listening on http://%s:%d (Ctrl-C to stop)",
                                              f"[{bound[0]}]" if ":" in bound[0] else bound[0], bound[1])
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # a Ctrl-C outside uvicorn's signal handlers (its setup, or a second one at its end)
        return leave(130, "magicdec serve: interrupted")
    finally:
        if events is not None:
            events.close()
    if failure:
        e = failure[0]
        if isinstance(e, ValueError | MemoryError | FileNotFoundError):
            leave(2, f"magicdec serve: error: {e}")  # returns only when no thread is left: then said by `magicdec`
            raise e
        return leave(1)
    return leave(0)


WILDCARDS = ("0.0.0.0", "::", "")
DRAIN_QUIET_S = 2.0  # a draining server listens until no request has arrived for this long


def kv_event_publisher(args: argparse.Namespace, device_type: str) -> KVEventPublisher | None:
    """The KV-event publisher `--kv-events-endpoint` asks for (bound now: a busy port is one line), or None."""
    if args.kv_events_endpoint is None:
        if args.kv_events_replay_endpoint is not None:
            raise ValueError("--kv-events-replay-endpoint needs --kv-events-endpoint")
        return None
    if args.no_prefix_caching:
        raise ValueError("--kv-events-endpoint publishes the prefix cache's changes: drop --no-prefix-caching")
    from magicdec.server.kv_events import KVEventPublisher, binds, local_endpoint

    endpoint = local_endpoint(args.kv_events_endpoint, args.host, WILDCARDS)
    replay = args.kv_events_replay_endpoint
    replay = None if replay is None else local_endpoint(replay, args.host, WILDCARDS)
    if args.host in WILDCARDS and "*" in endpoint and args.api_key is None:
        print("magicdec serve: warning: KV events (prompts' token ids) are published on every interface, "
              "without authentication", file=sys.stderr)
    publisher = KVEventPublisher(endpoint, replay, topic=args.kv_events_topic,
                                 data_parallel_rank=args.data_parallel_rank,
                                 medium="GPU" if device_type == "cuda" else "CPU", fmt=args.kv_events_format,
                                 bind=binds(args.kv_events_endpoint))
    logging.getLogger("magicdec.server").info("KV events on %s%s", publisher.endpoint,
                                              f", replay on {publisher.replay_endpoint}" if replay else "")
    return publisher
WORKERS = ("magicdec-load", "magicdec-engine")  # the server's threads that run the model (magicdec.server)


def checked_api_key(key: str | None) -> str | None:
    """The API key, or None (no authentication) when none is given; an empty or blank key is refused: it would
    otherwise turn authentication off without a word."""
    if key is not None and not key.strip():
        raise ValueError("the API key (--api-key or $MAGICDEC_API_KEY) is empty, which would turn authentication "
                         "off: give a key, or leave both out to serve without one")
    if key is not None and (key != key.strip() or not key.isprintable()):
        raise ValueError("--api-key has spaces or control characters at its ends or inside: clients cannot send it "
                         "in an 'Authorization: Bearer' header; use printable characters only")
    return key


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` names (as asyncio's `create_server` would bind them), made before
    the model loads so that a bad --host or a busy --port is one line; uvicorn listens on them."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: neither an address nor a name this machine resolves ({e}): use 127.0.0.1, "
                         "0.0.0.0 (every interface) or one of this machine's addresses") from None
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    if port == 0:  # one address: two would each get a different free port
        addresses = addresses[:1]
    sockets: list[socket.socket] = []
    try:
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ValueError(bind_error(e, host, port)) from None
    return sockets


def bind_error(e: OSError, host: str, port: int) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"--port {port}: {where} is in use (another server?): stop it or choose another --port"
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host}: not an address of this machine ({e.strerror}): use 127.0.0.1, 0.0.0.0 (every "
                "interface) or one of this machine's addresses")
    if e.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need privileges): choose a port ≥ 1024"
    return f"cannot listen on {where}: {e.strerror or e}"


def leave(status: int, line: str | None = None) -> int:
    """`status`, once the server has stopped. While a thread still runs the model (stopped while it loads, or
    an engine step that outlived the shutdown), the interpreter's teardown would stop under it (C++ aborts:
    "terminate called without an active exception"): then say `line`, flush, run the exit handlers and end
    the process here."""
    if not any(t.name in WORKERS and t.is_alive() for t in threading.enumerate()):
        if line and status != 2:
            print(line, file=sys.stderr)
        return status
    if line:
        print(line, file=sys.stderr)
    logging.shutdown()
    atexit._run_exitfuncs()  # the watchdog's count under torchrun, among others
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def make_server(config: Any, state: Any, quiet_s: float = DRAIN_QUIET_S) -> Any:
    """uvicorn's server, but a SIGTERM or SIGINT first drains the app: new requests (and `/health`) get 503
    while running ones finish; after a SIGTERM (what an orchestrator sends) it also listens until no request has
    arrived for `quiet_s` seconds, so that a router sees the replica leave and none of its requests meets a
    closed socket. All within --shutdown-timeout seconds (at once while the model still loads); then uvicorn's
    shutdown, and the process exits 0 (uvicorn would re-raise the signal and die of it). A second signal shuts
    down at once (a third Ctrl-C forces)."""
    import uvicorn

    class Server(uvicorn.Server):
        draining_since: float | None = None
        quiet_needed = 0.0
        last_seen: tuple[int, float] = (-1, 0.0)  # (requests served, when that count last changed)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.draining_since is None and not self.should_exit:
                self.draining_since = time.monotonic()
                self.quiet_needed = quiet_s if sig == signal.SIGTERM else 0.0
                state.drain()
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            if self.draining_since is None:
                return False
            now = time.monotonic()
            if self.server_state.total_requests != self.last_seen[0]:
                self.last_seen = (self.server_state.total_requests, now)
            timeout = self.config.timeout_graceful_shutdown
            quiet = now - max(self.last_seen[1], self.draining_since) >= self.quiet_needed
            late = timeout is not None and now - self.draining_since >= timeout
            if not state.serving or (state.drained() and quiet) or late:
                self.should_exit = True
                if timeout is not None:  # uvicorn's graceful shutdown has what is left of it
                    self.config.timeout_graceful_shutdown = max(0.1, timeout - (now - self.draining_since))
            return self.should_exit

        @contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in original.items():
                    signal.signal(s, handler)

    return Server(config)
