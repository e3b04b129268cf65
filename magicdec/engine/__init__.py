"""The engine core: a batch (`batch.py`: built by prefill or random KV), its per-row state and stop rules
(`state.py`), one round at a time (`step.py`: `Decoding.step(γ) → RoundReport`), and what a generation
returns (`outputs.py`). Who chooses γ and what is done with the reports lives in the layers above."""
