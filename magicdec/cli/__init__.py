"""The `magicdec` command: one module per sub-command, shared flags and parsers in `args.py`."""
