"""Where magicdec keeps downloaded data: ``$MAGICDEC_HOME`` (default ``~/.cache/magicdec``).

This file owns the directory layout only; it creates nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "MAGICDEC_HOME"
DEFAULT_HOME = Path("~/.cache/magicdec")


def magicdec_home() -> Path:
    """The root of magicdec's data: ``$MAGICDEC_HOME`` if set and non-empty, else ``~/.cache/magicdec``."""
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()


def corpora_dir() -> Path:
    """The directory holding one sub-directory per installed corpus."""
    return magicdec_home() / "corpora"
