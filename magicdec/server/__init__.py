"""`magicdec serve`: an OpenAI-compatible HTTP server over the serving engine (FastAPI + uvicorn).

`app` holds the routes, `protocol` the request bodies and their checks, `runner` the engine's thread,
`metrics` the Prometheus metrics (vLLM's names).
"""

from magicdec.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
