"""The `magicdec` command: one sub-command per module in this package.

Each sub-command module exposes `register(subparsers)`, which adds its parser and sets `func`.
Errors that name a problem (bad input, a missing file, a plan that does not fit) are printed as one
line and exit with status 2, argparse's own included; set MAGICDEC_DEBUG=1 to see the traceback instead.
Ctrl-C, from the first moment on (this module imports nothing heavy before it can catch it), prints one
line and exits with status 130. Under torchrun a rank that fails ends every other rank with its error
(`magicdec.parallel.watchdog`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import NoReturn

COMMANDS = ("generate", "serve", "plan", "profile", "bench", "corpus")
# what the lab (corpora, benchmarks, plots) needs beyond serving: `pip install 'magicdec[lab]'`
LAB_PACKAGES = ("matplotlib", "rdata", "httpx", "datasets")


class Parser(argparse.ArgumentParser):
    """argparse's parser, its errors said in one line (the usage is `--help`'s)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="magicdec",
                    description="Long-context LLM inference with speculative decoding over sparse-KV drafts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"magicdec.cli.{name}").register(sub)
    return parser


def named_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line, found before parsing (for a Ctrl-C while importing)."""
    return next((a for a in argv if a in COMMANDS), None)


def interrupted_line(command: str | None) -> str:
    return f"magicdec{' ' + command if command else ''}: interrupted"


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    command = named_command(given)
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(given)  # (serve --data-parallel-size starts replicas with the same arguments)
        command = args.command
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(interrupted_line(command), file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in LAB_PACKAGES or os.environ.get("MAGICDEC_DEBUG"):
            raise
        extra = "datasets" if e.name == "datasets" else "'magicdec[lab]'"
        print(f"magicdec {command}: error: this needs {e.name}, which serving does not: pip install {extra}",
              file=sys.stderr)
        return 2
    except (ValueError, MemoryError, FileNotFoundError) as e:
        if os.environ.get("MAGICDEC_DEBUG"):
            raise
        from magicdec.parallel.watchdog import end_failed_rank

        # under torchrun every rank meets the same bad input: rank 0 says it; a failure of one rank alone
        # is said by that rank, and by the other ranks' watchdogs as they stop.
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(e, ValueError):
            prefix = "" if rank == 0 else f"[rank {rank}] "
            print(f"{prefix}magicdec {command}: error: {one_line(e)}", file=sys.stderr)
        end_failed_rank(e, 2)  # under torchrun: the other ranks stop with this error, and this rank ends now
        return 2


def entry() -> NoReturn:
    """The process's entry (the `magicdec` script, `python -m magicdec`): main's status is the exit status.

    Once Ctrl-C has been pressed the process ends with `os._exit` (streams flushed, main's own clean-up done):
    CPython kills itself with SIGINT at exit when an interrupt ever landed in an `exec` of source text (as
    `dataclasses` runs while modules import), even one that was caught, so the status would be -2, not 130.
    An interrupt that lands where Python cannot raise it (a weakref callback, a `__del__`: "Exception ignored
    in ...") would be swallowed and the command would run on; it ends the process there, with the same line.
    Once main has returned, Ctrl-C is ignored: the process is only exiting (a signal then would kill it)."""
    interrupted = False
    default_hook = sys.unraisablehook

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    def on_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            print(interrupted_line(named_command(sys.argv[1:])), file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        default_hook(unraisable)

    sys.unraisablehook = on_unraisable
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        code = main()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a Ctrl-C while exiting changes nothing
    except KeyboardInterrupt:  # pressed just as main returned
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(interrupted_line(named_command(sys.argv[1:])), file=sys.stderr)
        code, interrupted = 130, True
    if interrupted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


if __name__ == "__main__":
    entry()
