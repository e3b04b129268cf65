"""`magicdec serve`: an OpenAI-compatible server (completions, chat completions, models, metrics).

    magicdec serve --spec self --budget 512 --gamma auto
    magicdec serve --model path/to/Llama-3.1-8B --host 0.0.0.0 --port 8000 --api-key "$KEY"

The server listens at once; the model loads behind it (GET /health: 503 while loading, 200 when ready).
SIGTERM (or Ctrl-C): new requests get 503, running ones finish (at most --shutdown-timeout seconds,
then they are aborted), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from magicdec.cli.args import add_spec_flags, parse_count, parse_size, spec_from_args
from magicdec.engine.scheduler import SchedulerConfig
from magicdec.llm import LLM
from magicdec.loading import builtin_model_path, resolve_device
from magicdec.parallel.tp import init_from_env


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
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=parse_count, default=8, help="requests in the running batch (default 8)")
    e.add_argument("--max-num-batched-tokens", type=parse_count, default=1024,
                   help="tokens per step: decoding rounds and prefill chunks (default 1024)")
    e.add_argument("--prefill-chunk", type=parse_count, default=512, help="prompt tokens per prefill chunk")
    e.add_argument("--num-blocks", type=parse_count, help="KV-cache blocks of 64 tokens (default: from memory)")
    e.add_argument("--kv-cache-memory", type=parse_size, help="bytes for the KV cache, e.g. 4GiB")
    e.add_argument("--max-model-len", type=parse_count, help="longest prompt + output (default: the model's)")
    e.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
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
    name = args.served_model_name or default_model_name(args.model)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # under torchrun: every rank loads its shard; rank 0 answers HTTP and schedules, broadcasting each step's
    # new and aborted requests; the other ranks follow its steps (a rank that fails ends all: the watchdog)
    device_type = resolve_device(args.device).type
    tp = init_from_env(device_type)

    def load() -> Engine:
        llm = LLM(args.model, dtype=args.dtype, device=args.device if tp is None else device_type,
                  prefill_chunk=args.prefill_chunk, tp=tp)
        return Engine(llm=llm, spec=spec if spec.enabled else None, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                      num_blocks=args.num_blocks, kv_cache_memory=args.kv_cache_memory,
                      enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len,
                      quiet=tp is not None and tp.rank != 0)

    if tp is not None and tp.rank != 0:
        from magicdec.server.runner import follow

        for s in (signal.SIGINT, signal.SIGTERM):  # rank 0 drains and tells this rank when to stop
            signal.signal(s, signal.SIG_IGN)
        follow(load())
        return 0

    failure: list[BaseException] = []
    config = ServerConfig(name, api_key=args.api_key, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          log_interval=args.log_interval)
    app = create_app(config, load)
    server = make_server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   access_log=not args.no_access_log,
                                   timeout_graceful_shutdown=args.shutdown_timeout),
                         app.state.magicdec.drain)

    def fatal(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    config.on_fatal = fatal
    server.run()
    if failure:
        e = failure[0]
        if isinstance(e, ValueError | MemoryError | FileNotFoundError):
            raise e  # said in one line by `magicdec` (exit status 2)
        return 1
    return 0


def make_server(config: Any, on_exit: Callable[[], None]) -> Any:
    """uvicorn's server, but a SIGTERM or SIGINT first drains the app (new requests: 503) and, once the
    graceful shutdown is over, the process exits 0 (uvicorn would re-raise the signal and die of it)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_exit()
            super().handle_exit(sig, frame)

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
