"""The server app (`create_app`, as `magicdec serve` builds it) served by uvicorn on 127.0.0.1 in a thread
of the test process, over an engine on a small random checkpoint: fast enough for many requests, and the
test can reach the engine, the runner and the app's state. A checkpoint with a chat template serves the
chat routes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from conftest import free_port, tiny_config, write_checkpoint
from magicdec.server import ServerConfig, create_app
from magicdec.server.app import ServerState
from magicdec.serving import Engine

MODEL = "tiny"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def chat_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny random checkpoint, with a chat template in its tokenizer_config.json."""
    write_checkpoint(path, tiny_config(), seed=seed)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return path


class AppServer:
    """`create_app(ServerConfig(MODEL, **config), load)` under uvicorn in a thread; a context manager that
    waits until /health answers 200 and, on exit, shuts the server down as SIGTERM would."""

    def __init__(self, load: Callable[[], Engine], **config: Any) -> None:
        self.fatal: list[BaseException] = []
        self.config = ServerConfig(MODEL, on_fatal=self.fatal.append, **config)
        self.app = create_app(self.config, load)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.headers = {"Authorization": f"Bearer {config['api_key']}"} if config.get("api_key") else {}

    @property
    def state(self) -> ServerState:
        return self.app.state.magicdec

    @property
    def engine(self) -> Engine:
        assert self.state.engine is not None
        return self.state.engine

    def __enter__(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.state.load_error is not None:
                raise RuntimeError(f"the engine failed to load: {self.state.load_error}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server was not ready within 120 s")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.state.drain()
        self.server.should_exit = True
        self.thread.join(60)

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, **{"timeout": 120, **kw})

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
