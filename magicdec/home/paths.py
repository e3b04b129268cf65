"""Where magicdec keeps downloaded and converted data: ``$MAGICDEC_HOME``, else ``$XDG_CACHE_HOME/magicdec``,
else ``~/.cache/magicdec`` (the XDG base directory specification's default cache).

This file owns the directory layout only; it creates nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "MAGICDEC_HOME"
ENV_XDG_CACHE = "XDG_CACHE_HOME"
DEFAULT_CACHE = Path("~/.cache")


def magicdec_home() -> Path:
    """The root of magicdec's data: ``$MAGICDEC_HOME`` if set and non-empty, else ``$XDG_CACHE_HOME/magicdec`` if
    that is set to an absolute path (the specification ignores a relative one), else ``~/.cache/magicdec``."""
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get(ENV_XDG_CACHE)
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else DEFAULT_CACHE
    return cache.expanduser() / "magicdec"


def corpora_dir() -> Path:
    """The directory holding one sub-directory per installed corpus."""
    return magicdec_home() / "corpora"
