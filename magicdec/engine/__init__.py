"""The engine: one core for every client (`core.py`: EngineCore, built from an `EngineConfig` — `config.py`
— over the models of `models.py`), its step in three parts — the scheduler (`scheduler.py`: schedule →
Plan, update from a ModelOutput), the model runner (`runner.py`: execute a Plan) — the requests (`request.py`),
and what the engine returns (`outputs.py`: StepOutput deltas, GenerationResult)."""
