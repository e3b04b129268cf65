"""Where magicdec keeps its data (`paths`: ``$MAGICDEC_HOME``, else ``$XDG_CACHE_HOME/magicdec``, else
``~/.cache/magicdec``) and the one-time work done there (`locks`: the file lock a kernel build or a GGUF
conversion takes, and its progress lines).
"""

from magicdec.home.locks import exclusive, say
from magicdec.home.paths import ENV_HOME, corpora_dir, magicdec_home

__all__ = ["ENV_HOME", "corpora_dir", "exclusive", "magicdec_home", "say"]
