"""``magicdec corpus``: fetch a corpus into ``$MAGICDEC_HOME`` or describe one.

This file owns the ``corpus`` sub-command only; the work is in `magicdec.bench.corpora`.

    magicdec corpus fetch austen [--dest DIR] [--deb FILE]
    magicdec corpus info [SPEC] [--jsonl-field FIELD] [--tokenizer tokenizer.json]

``python -m magicdec.cli.corpus fetch austen`` does the same without the main CLI (e.g. in a Makefile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from magicdec.bench.corpora import CorpusError, fetch_austen, load_corpus


def register(subparsers: Any) -> None:
    """Add the ``corpus`` sub-command to `subparsers` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "corpus", help="fetch or describe a text corpus", description="Fetch or describe a text corpus."
    )
    actions = parser.add_subparsers(dest="corpus_action", metavar="ACTION", required=True)
    fetch = actions.add_parser("fetch", help="download a corpus into $MAGICDEC_HOME/corpora")
    fetch.add_argument("name", choices=["austen"], help="the corpus to fetch")
    fetch.add_argument("--dest", type=Path, help="install here instead of $MAGICDEC_HOME/corpora/janeaustenr")
    fetch.add_argument(
        "--deb", type=Path, help="use this r-cran-janeaustenr .deb instead of apt-get download"
    )
    info = actions.add_parser("info", help="list a corpus's documents and their sizes")
    info.add_argument(
        "spec",
        nargs="?",
        default="austen",
        help="'austen', 'pg19[:SPLIT]', or a .txt/.jsonl file or directory",
    )
    info.add_argument(
        "--jsonl-field", default="text", help="the JSONL field holding the text (default: text)"
    )
    info.add_argument(
        "--tokenizer", type=Path, help="a tokenizer.json (or a directory with one): count tokens"
    )
    parser.set_defaults(func=run)


def _token_counter(path: Path) -> Any:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CorpusError(f"no tokenizer file {file}")
    tokenizer = Tokenizer.from_file(str(file))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def run(args: argparse.Namespace) -> int:
    """Carry out ``args.corpus_action``; a `CorpusError` exits with status 1 and its message."""
    try:
        if args.corpus_action == "fetch":
            print(fetch_austen(args.dest, deb=args.deb))
            return 0
        corpus = load_corpus(args.spec, jsonl_field=args.jsonl_field)
        count = _token_counter(args.tokenizer) if args.tokenizer else None
    except CorpusError as exc:
        raise SystemExit(f"magicdec corpus {args.corpus_action}: {exc}") from exc
    width = max(len("document"), *(len(doc.name) for doc in corpus))
    header = f"{'document':<{width}}  {'chars':>10}" + (f"  {'tokens':>9}" if count else "")
    print(f"corpus {corpus.name!r}: {len(corpus)} documents")
    print(header)
    total_chars = total_tokens = 0
    for doc in corpus:
        total_chars += len(doc.text)
        line = f"{doc.name:<{width}}  {len(doc.text):>10,}"
        if count:
            tokens = count(doc.text)
            total_tokens += tokens
            line += f"  {tokens:>9,}"
        print(line)
    print(f"{'total':<{width}}  {total_chars:>10,}" + (f"  {total_tokens:>9,}" if count else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m magicdec.cli.corpus ACTION ...``."""
    parser = argparse.ArgumentParser(prog="python -m magicdec.cli.corpus")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["corpus", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
