"""Speculative decoding: what to run (`config.py`: SpecConfig), who drafts over which KV (`drafter.py`,
`factory.py`, SnapKV selection in `snapkv.py`), and the exact acceptance rules (`verify.py`)."""
