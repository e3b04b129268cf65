"""The Jane Austen corpus: six public-domain novels from Debian's ``r-cran-janeaustenr`` package.

This file owns fetching the package's two data files into ``$MAGICDEC_HOME/corpora/janeaustenr/``
(`fetch_austen`) and parsing them into a `Corpus` (`load_austen`).

Format: ``Rdata.rdx`` is a gzip-compressed R serialization of a list whose ``variables`` entry maps each
object name to ``(offset, length)`` in ``Rdata.rdb``. Each blob there is a 4-byte big-endian
uncompressed length followed by a zlib stream of an R serialization of a character vector: one
element per line of the book. The ``rdata`` package parses both serializations.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from magicdec.bench.corpora.corpus import Corpus, CorpusError, Document
from magicdec.home.paths import corpora_dir

PACKAGE = "r-cran-janeaustenr"
FILES = ("Rdata.rdb", "Rdata.rdx")  # install order: the index last, so its presence means "complete"
DEB_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
# R object name -> title, in publication order (the order of janeaustenr::austen_books()).
BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
FIX = "run `make corpus` or `magicdec corpus fetch austen`"


def austen_dir() -> Path:
    """Default install location: ``$MAGICDEC_HOME/corpora/janeaustenr``."""
    return corpora_dir() / "janeaustenr"


def _parse_r(data: bytes) -> object:
    # extension=".rds" tells rdata the bytes are a bare serialization (silences "Unknown file type").
    import rdata  # only needed to read the Austen corpus

    return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def _read_index(rdx: Path) -> dict[str, tuple[int, int]]:
    try:
        variables = _parse_r(rdx.read_bytes())["variables"]  # rdata un-gzips by itself
        return {str(name): (int(span[0]), int(span[1])) for name, span in variables.items()}
    except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorpusError(f"cannot read the corpus index {rdx}: {exc}; delete it and {FIX}") from exc


def is_installed(path: str | Path | None = None) -> bool:
    """Whether both data files are present at `path` (default `austen_dir()`) with an index naming
    all six books."""
    root = Path(path) if path is not None else austen_dir()
    if not all((root / name).is_file() for name in FILES):
        return False
    try:
        return set(BOOKS) <= set(_read_index(root / "Rdata.rdx"))
    except CorpusError:
        return False


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr or result.stdout).strip()[-600:]


def _apt_download(workdir: Path) -> Path:
    manual = (
        f"download the {PACKAGE} .deb from https://packages.debian.org/stable/{PACKAGE} "
        "and run `magicdec corpus fetch austen --deb FILE`"
    )
    if shutil.which("apt-get") is None:
        raise CorpusError(f"apt-get not found, so the corpus cannot be fetched automatically; {manual}")
    cmd = ["apt-get", "download", PACKAGE]
    result = _run(cmd, workdir)
    if result.returncode != 0:
        if getattr(os, "geteuid", lambda: -1)() != 0:
            raise CorpusError(
                f"`{' '.join(cmd)}` failed: {_tail(result)}\n"
                "If the package lists are missing, run `sudo apt-get update` and try again; or " + manual
            )
        update = _run(["apt-get", "update"], workdir)  # root: the usual cause is missing package lists
        if update.returncode != 0:
            raise CorpusError(f"`apt-get update` failed: {_tail(update)}\nOr {manual}")
        result = _run(cmd, workdir)
        if result.returncode != 0:
            raise CorpusError(
                f"`{' '.join(cmd)}` failed after `apt-get update`: {_tail(result)}\nOr {manual}"
            )
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise CorpusError(f"`{' '.join(cmd)}` succeeded but left no {PACKAGE}_*.deb in {workdir}")
    return debs[-1]


def fetch_austen(dest: str | Path | None = None, *, deb: str | Path | None = None) -> Path:
    """Install ``Rdata.rdb`` and ``Rdata.rdx`` into `dest` (default `austen_dir()`) and return `dest`.

    Downloads the package with ``apt-get download`` (running ``apt-get update`` first if that fails and
    we are root), or uses the given `.deb` file, and unpacks it with ``dpkg-deb -x``. Returns at once if
    the files are already installed. Files are written under temporary names and renamed into place,
    so an interrupted fetch never leaves a half-written corpus.
    """
    root = Path(dest).expanduser() if dest is not None else austen_dir()
    if is_installed(root):
        return root
    if shutil.which("dpkg-deb") is None:
        raise CorpusError(
            "dpkg-deb not found: it is needed to unpack the .deb (Debian/Ubuntu package `dpkg`)"
        )
    with tempfile.TemporaryDirectory(prefix="magicdec-austen-") as tmp:
        work = Path(tmp)
        deb_path = Path(deb).expanduser().resolve() if deb is not None else _apt_download(work)
        if not deb_path.is_file():
            raise CorpusError(f"no such .deb file: {deb_path}")
        unpacked = work / "unpacked"
        result = _run(["dpkg-deb", "-x", str(deb_path), str(unpacked)], work)
        if result.returncode != 0:
            raise CorpusError(f"`dpkg-deb -x {deb_path}` failed: {_tail(result)}")
        source = unpacked / DEB_DATA_DIR
        root.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if not (source / name).is_file():
                raise CorpusError(f"{deb_path} has no {DEB_DATA_DIR}/{name}: is it {PACKAGE}?")
            partial = root / f"{name}.part"
            shutil.copyfile(source / name, partial)
            os.replace(partial, root / name)
    if not is_installed(root):
        raise CorpusError(f"installed {PACKAGE} into {root}, but its index does not list the six novels")
    return root


def lines_to_text(lines: Iterable[str | None]) -> str:
    """Join a book's lines into text: blank lines separate paragraphs (joined by one blank line), lines
    within a paragraph keep their line breaks and indentation (as in Project Gutenberg texts)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for raw in lines:
        line = "" if raw is None else str(raw).rstrip()  # None: an R NA
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs)


@functools.lru_cache(maxsize=4)
def _load(root: Path, stamp: tuple[int, int]) -> Corpus:
    index = _read_index(root / "Rdata.rdx")
    blob = (root / "Rdata.rdb").read_bytes()
    documents = []
    for name in BOOKS:
        if name not in index:
            raise CorpusError(f"{root / 'Rdata.rdx'} does not list {name!r}; delete {root} and {FIX}")
        offset, length = index[name]
        chunk = blob[offset : offset + length]
        try:
            (expected,) = struct.unpack(">I", chunk[:4])
            data = zlib.decompress(chunk[4:])
            if len(data) != expected:
                raise ValueError(f"decompressed to {len(data)} bytes, header says {expected}")
            lines = _parse_r(data)
        except (struct.error, zlib.error, ValueError) as exc:
            raise CorpusError(
                f"{root / 'Rdata.rdb'}: cannot read {name!r} ({exc}); delete {root} and {FIX}"
            ) from exc
        documents.append(Document(name, lines_to_text(lines)))
    return Corpus("austen", tuple(documents))


def load_austen(path: str | Path | None = None) -> Corpus:
    """The six novels as a `Corpus` named ``"austen"``; documents are named by their R object names
    (`BOOKS`, publication order). Cached per process while the files are unchanged."""
    root = (Path(path).expanduser() if path is not None else austen_dir()).resolve()
    missing = [root / name for name in FILES if not (root / name).is_file()]
    if missing:
        raise CorpusError(f"Jane Austen corpus not installed: {missing[0]} does not exist; {FIX}")
    stat = (root / "Rdata.rdb").stat()
    return _load(root, (stat.st_mtime_ns, stat.st_size))
