"""`python -m magicdec` (also what `torchrun -m magicdec` runs)."""

from magicdec.cli.main import entry

entry()
