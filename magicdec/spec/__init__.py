"""Speculative decoding: what to run (`config.py`: SpecConfig), who drafts over which KV and the draft loop
(`draft.py`), the sparse views of the paged cache a draft reads (`views.py`), SnapKV selection (`snapkv.py`),
and the exact acceptance rules (`verify.py`)."""
