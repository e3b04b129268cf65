"""Corpora for prompts: the Jane Austen novels, local text/JSONL files, PG-19; and `make_prompts`.

`corpus.py` owns the data types, file loading and prompt cutting; `sources.py` resolves a corpus name;
`austen.py` fetches and parses the Austen corpus; `paths.py` says where downloaded data lives
(``$MAGICDEC_HOME``, else ``$XDG_CACHE_HOME/magicdec``, else ``~/.cache/magicdec``); `locks.py` prints
progress lines and holds the file lock that one-time work (a kernel build, a GGUF conversion) takes.
"""

from magicdec.data.austen import austen_dir, fetch_austen, load_austen
from magicdec.data.corpus import Corpus, CorpusError, Document, make_prompts
from magicdec.data.paths import corpora_dir, magicdec_home
from magicdec.data.sources import load_corpus

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "austen_dir",
    "corpora_dir",
    "fetch_austen",
    "load_austen",
    "load_corpus",
    "magicdec_home",
    "make_prompts",
]
