"""The `magicdec` command: one sub-command per module in this package.

Each sub-command module exposes `register(subparsers)`, which adds its parser and sets `func`.
Errors that name a problem (bad input, a missing file, a plan that does not fit) are printed as one
line and exit with status 2; set MAGICDEC_DEBUG=1 to see the traceback instead. Under torchrun a rank
that fails ends every other rank with its error (`magicdec.parallel.watchdog`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from magicdec.parallel.watchdog import end_failed_rank

COMMANDS = ("generate", "serve", "plan", "profile", "bench", "corpus")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magicdec",
        description="Long-context LLM inference with speculative decoding over sparse-KV drafts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"magicdec.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"magicdec {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, MemoryError, FileNotFoundError) as e:
        if os.environ.get("MAGICDEC_DEBUG"):
            raise
        # under torchrun every rank meets the same bad input: rank 0 says it; a failure of one rank alone
        # is said by that rank, and by the other ranks' watchdogs as they stop.
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(e, ValueError):
            prefix = "" if rank == 0 else f"[rank {rank}] "
            print(f"{prefix}magicdec {args.command}: error: {e}", file=sys.stderr)
        end_failed_rank(e, 2)  # under torchrun: the other ranks stop with this error, and this rank ends now
        return 2


if __name__ == "__main__":
    sys.exit(main())
