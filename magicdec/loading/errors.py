"""The error every loader raises for a checkpoint it cannot use: it names the file and the fix."""

from __future__ import annotations


class LoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message says what is wrong and what to do."""
