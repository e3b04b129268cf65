"""Tests for magicdec.bench.corpora (corpora, make_prompts) and the `magicdec corpus` CLI.

The Austen tests need the corpus installed (`make corpus`); without it they fail, naming the fix.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from magicdec.bench.corpora import Corpus, CorpusError, Document, load_austen, load_corpus, make_prompts
from magicdec.bench.corpora.austen import BOOKS, DEB_DATA_DIR, FILES, austen_dir, fetch_austen, is_installed
from magicdec.cli import corpus as corpus_cli


class HFTokenizer:
    """The `Tokenizer` protocol over a `tokenizers.Tokenizer`, memoized so repeated calls are cheap."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encode = functools.lru_cache(maxsize=None)(self._encode)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def position_tokenizer(size: int) -> HFTokenizer:
    """WordLevel over words "w0".."w{size-1}": the token id of "wK" is K, so ids reveal offsets."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    return HFTokenizer(tokenizer)


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


# Three documents whose token ids are their global word positions.
SPANS = [(0, 1000), (1000, 3000), (3000, 3500)]
SYNTHETIC = Corpus(
    "synthetic", tuple(Document(name, words(*span)) for name, span in zip("abc", SPANS, strict=True))
)
TOK = position_tokenizer(3500)


@pytest.fixture(scope="module")
def austen_tokenizer(austen: Corpus) -> HFTokenizer:
    """A tiny byte-level BPE trained on a slice of one novel (no model download)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([austen.documents[0].text[:100_000]], trainer)
    return HFTokenizer(tokenizer)


# --- Austen ---------------------------------------------------------------------------------------------


def test_austen_has_six_novels(austen: Corpus) -> None:
    assert austen.name == "austen"
    assert austen.names == list(BOOKS)
    books = {doc.name: doc.text for doc in austen}
    assert "Emma Woodhouse, handsome, clever, and rich" in books["emma"]
    assert books["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in books["prideprejudice"]
    assert "Anne Elliot" in books["persuasion"] and "Catherine Morland" in books["northangerabbey"]
    for name, text in books.items():
        assert 400_000 < len(text) < 1_000_000, name
        assert "\n\n\n" not in text and "\n\n" in text, name  # paragraphs, one blank line apart
    assert load_corpus("austen") is austen  # cached while the files are unchanged


def test_austen_missing_names_the_fix(tmp_path) -> None:
    with pytest.raises(CorpusError, match=r"Rdata\.rdb does not exist.*make corpus"):
        load_austen(tmp_path)


def test_austen_prompts(austen: Corpus, austen_tokenizer: HFTokenizer) -> None:
    books = austen.subset(["northangerabbey", "persuasion"])  # the two shortest: tokenizing takes seconds
    prompts = make_prompts(austen_tokenizer, books, batch=6, context=2048, seed=1)
    assert [len(p) for p in prompts] == [2048] * 6
    assert len({tuple(p) for p in prompts}) == 6
    assert prompts == make_prompts(austen_tokenizer, books, 6, 2048, seed=1)
    assert prompts != make_prompts(austen_tokenizer, books, 6, 2048, seed=2)
    texts = [austen_tokenizer.decode(p) for p in prompts]
    sources = [next(doc.name for doc in books if text in doc.text) for text in texts]
    assert sorted(sources) == ["northangerabbey"] * 3 + ["persuasion"] * 3  # round-robin over books


def test_fetch_from_deb_is_idempotent(tmp_path, austen: Corpus) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    package = tmp_path / "package"  # a stand-in .deb holding the installed files at the package's path
    (package / DEB_DATA_DIR).mkdir(parents=True)
    (package / "DEBIAN").mkdir()
    for name in FILES:
        shutil.copyfile(austen_dir() / name, package / DEB_DATA_DIR / name)
    (package / "DEBIAN" / "control").write_text(
        "Package: r-cran-janeaustenr\nVersion: 1.0.0-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: test\n"
    )
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(package), str(deb)],
        check=True,
        capture_output=True,
    )
    dest = fetch_austen(tmp_path / "installed", deb=deb)
    assert is_installed(dest) and sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    assert (dest / "Rdata.rdb").read_bytes() == (austen_dir() / "Rdata.rdb").read_bytes()
    assert fetch_austen(dest, deb=tmp_path / "absent.deb") == dest  # installed: returns without work
    with pytest.raises(CorpusError, match="no such .deb file"):
        fetch_austen(tmp_path / "other", deb=tmp_path / "absent.deb")


# --- make_prompts ---------------------------------------------------------------------------------------


def test_exact_lengths_distinct_and_deterministic() -> None:
    prompts = make_prompts(TOK, SYNTHETIC, batch=7, context=300, seed=0)
    assert [len(p) for p in prompts] == [300] * 7
    assert len({tuple(p) for p in prompts}) == 7
    for p in prompts:  # contiguous passages of one document
        assert p == list(range(p[0], p[0] + 300))
    assert prompts == make_prompts(TOK, SYNTHETIC, batch=7, context=300, seed=0)
    assert prompts != make_prompts(TOK, SYNTHETIC, batch=7, context=300, seed=1)


def test_round_robin_over_documents() -> None:
    prompts = make_prompts(TOK, SYNTHETIC, batch=6, context=400, seed=3)
    docs = [0 if p[0] < 1000 else 1 if p[0] < 3000 else 2 for p in prompts]
    assert sorted(docs) == [0, 0, 1, 1, 2, 2]
    # Document c has 500 tokens: a 600-token prompt can come only from a or b.
    docs = [0 if p[0] < 1000 else 1 for p in make_prompts(TOK, SYNTHETIC, batch=4, context=600)]
    assert sorted(docs) == [0, 0, 1, 1]


def test_ragged_lengths() -> None:
    lengths = [900, 17, 1500, 250, 1]
    prompts = make_prompts(TOK, SYNTHETIC, lengths=lengths, seed=5)
    assert [len(p) for p in prompts] == lengths
    assert prompts == make_prompts(TOK, SYNTHETIC, len(lengths), lengths=lengths, seed=5)
    with pytest.raises(CorpusError, match="conflicts"):
        make_prompts(TOK, SYNTHETIC, batch=2, lengths=lengths)
    with pytest.raises(CorpusError, match="must be integers"):
        make_prompts(TOK, SYNTHETIC, lengths=[10.5])
    with pytest.raises(CorpusError, match="positive lengths"):
        make_prompts(TOK, SYNTHETIC, batch=0, context=10)


def test_head_and_tail_never_overlap() -> None:
    def located(region: object) -> list[tuple[list[int], int, int]]:
        prompts = [p for seed in range(5) for p in make_prompts(TOK, SYNTHETIC, 6, 200, seed, region=region)]
        return [(p, lo, hi) for p in prompts for lo, hi in SPANS if lo <= p[0] < hi]

    head, tail = located("head"), located("tail")
    assert all(p[-1] < (lo + hi) // 2 for p, lo, hi in head)  # inside the first half of its document
    assert all(p[0] >= (lo + hi) // 2 for p, lo, hi in tail)
    assert not {t for p, _, _ in head for t in p} & {t for p, _, _ in tail for t in p}
    window = make_prompts(TOK, SYNTHETIC, 3, 100, region=(0.9, 1.0))
    assert all(p[0] >= 900 for p in window)
    with pytest.raises(CorpusError, match="unknown region"):
        make_prompts(TOK, SYNTHETIC, 1, 10, region="middle")


def test_too_short_corpus() -> None:
    with pytest.raises(CorpusError, match=r"no document .* has 2001 tokens .* the longest, 'b', has 2000"):
        make_prompts(TOK, SYNTHETIC, batch=1, context=2001)
    with pytest.raises(CorpusError, match="has 1000 \\(of 2000\\)"):
        make_prompts(TOK, SYNTHETIC, batch=1, context=1500, region="tail")
    tiny = Corpus("tiny", (Document("only", words(0, 10)),))
    assert len(make_prompts(TOK, tiny, batch=2, context=9)) == 2  # two distinct offsets exist
    with pytest.raises(CorpusError, match="cannot give 3 distinct passages of 9 tokens"):
        make_prompts(TOK, tiny, batch=3, context=9)


def test_accepts_tokenizers_encoding() -> None:
    class Raw:  # encode returns a `tokenizers.Encoding`, as `tokenizers.Tokenizer.encode` does
        encode = TOK.tokenizer.encode
        decode = TOK.tokenizer.decode

    assert make_prompts(Raw(), SYNTHETIC, 2, 50) == make_prompts(TOK, SYNTHETIC, 2, 50)


def test_asks_for_no_special_tokens() -> None:
    class WithBos:  # adds a BOS (id 0) unless told not to, like magicdec.loading's Tokenizer
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [0] * add_special_tokens + TOK.encode(text)

        def decode(self, ids: list[int]) -> str:
            return TOK.decode(ids)

    tiny = Corpus("tiny", (Document("only", words(1, 11)),))
    assert make_prompts(WithBos(), tiny, 1, 10) == [list(range(1, 11))]


# --- load_corpus ----------------------------------------------------------------------------------------


def test_load_text_jsonl_and_directory(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("First book.\n\nSecond paragraph.", encoding="utf-8")
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}]
    (tmp_path / "two.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")

    single = load_corpus(tmp_path / "one.txt")
    assert single.documents == (Document("one.txt", "First book.\n\nSecond paragraph."),)
    assert [d.text for d in load_corpus(str(tmp_path / "two.jsonl"))] == ["alpha", "beta"]
    folder = load_corpus(str(tmp_path))
    assert folder.names == ["one.txt", "two.jsonl:1", "two.jsonl:2"]
    assert folder.subset(["two.jsonl:2"]).names == ["two.jsonl:2"]

    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    assert load_corpus(tmp_path / "other.jsonl", jsonl_field="body").documents[0].text == "x"


def test_load_errors(tmp_path) -> None:
    with pytest.raises(CorpusError, match="no such corpus .*nope.txt.*austen, pg19"):
        load_corpus(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x", "title": "t"}) + "\n")
    with pytest.raises(
        CorpusError, match=r"bad\.jsonl, line 2: no field 'text'; available keys: 'body', 'title'"
    ):
        load_corpus(bad)
    bad.write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 1: invalid JSON"):
        load_corpus(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="has no .txt/.jsonl files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unsupported file type '.csv'"):
        load_corpus(tmp_path / "x.csv")


def test_pg19_without_datasets(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CorpusError, match="needs the `datasets` package"):
        load_corpus("pg19")


# --- CLI ------------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="magicdec")
    corpus_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_info(tmp_path, capsys) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    args = parse(["corpus", "info", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "1 documents" in out and "a.txt" in out and "11" in out

    tokenizer_file = tmp_path / "tokenizer.json"
    TOK.tokenizer.save(str(tokenizer_file))
    (tmp_path / "w.txt").write_text(words(0, 42), encoding="utf-8")
    args = parse(["corpus", "info", str(tmp_path / "w.txt"), "--tokenizer", str(tmp_path)])
    assert args.func(args) == 0
    assert "42" in capsys.readouterr().out.splitlines()[-1]


def test_cli_errors_exit_with_message(tmp_path) -> None:
    args = parse(["corpus", "info", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="magicdec corpus info: no such corpus"):
        args.func(args)
    with pytest.raises(SystemExit):
        parse(["corpus", "fetch", "shakespeare"])


def test_standalone_entry_point(tmp_path, capsys) -> None:
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    assert corpus_cli.main(["info", str(tmp_path / "a.txt")]) == 0
    assert "a.txt" in capsys.readouterr().out
