"""The LLaMA-family decoder (`llama.py`), its rotary embeddings (`rope.py`) and attention masks and backends
(`attention.py`); the forward knows nothing of speculation or parallelism."""
