"""The engine: one core for every client (`core.py`: EngineCore, built from an `EngineConfig` — `config.py`
— over the models of `models.py`), its step in three parts — the scheduler (`scheduler.py`: schedule →
Plan, update), the model runner (`runner.py`: execute → ModelOutput) — the requests and their streams
(`request.py`), and what a generation returns (`outputs.py`)."""
