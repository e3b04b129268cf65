"""`magicdec generate` with bad input, as a new user types it: one line naming the problem and the fix,
exit status 2 (130 on Ctrl-C), and every argument checked before the model loads (the model path given
here does not exist, so an argument error must come first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from magicdec.cli import generate, main

MISSING = "/nonexistent/model"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    try:
        rc = main.main(["generate", "--model", MISSING, *argv])
    except SystemExit as e:  # argparse refusing a value
        rc = int(e.code)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
        (["--prompt", "x", "--seed", str(1 << 64)], "seed must be in [0, 2**64)"),
        (["--prompt", "x", "--spec", "self", "--sinks", "-1"], "attention sinks (--sinks) must be ≥ 0"),
        (["--prompt", "x", "--spec", "self", "--budget", "0"], "argument --budget: expected a positive whole number"),
        (["--corpus", "austen", "--context", "64", "--batch", "0"], "argument --batch: expected a positive"),
        (["--corpus", "austen", "--context", "-5"], "argument --context: expected a positive"),
        (["--prompt", "x", "--draft-model", "d"], "drop --draft-model or add --spec draft"),
        (["--prompt", "x", "--spec", "draft", "--draft-model", "/no/draft"], "--draft-model /no/draft: no such file"),
        (["--prompt", "x", "--spec", "self", "--gamma", "auto", "--profile", "v100"], "unknown hardware 'v100'"),
        (["--corpus", "/no/corpus.txt", "--context", "64"], "no such corpus"),
        (["--corpus", "austen", "--context", "64", "--region", "middle"], "unknown region 'middle'"),
        (["--prompt", "x", "--device", "cuda"], "no CUDA device"),
        (["--prompt", "x", "--device", "cuda:1"], "no CUDA device"),
        (["--prompt", "x", "--device", "mps"], "MPS is not available"),
        (["--prompt", "x", "--device", "tpu9"], "is not a device name"),
        (["--prompt", "x"], "the path does not exist"),  # only now does the model's absence show
    ],
)
def test_bad_input_gets_one_line_naming_the_problem(capsys: pytest.CaptureFixture, argv: list[str],
                                                    words: str) -> None:
    rc, err = run(capsys, *argv)
    assert rc == 2 and words in err.splitlines()[-1], err  # argparse prints its usage first: the error is last
    assert "Traceback" not in err and err.splitlines()[-1].startswith("magicdec generate: error: ")


def test_prompt_files_that_are_not_text_are_named(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc, err = run(capsys, "--prompt-file", str(tmp_path))
    assert rc == 2 and "is a directory" in err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    rc, err = run(capsys, "--prompt-file", str(latin))
    assert rc == 2 and "latin1.txt is not UTF-8" in err


def test_ctrl_c_exits_with_one_line_and_status_130(capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "LLM", interrupted)
    rc, err = run(capsys, "--prompt", "x")
    assert rc == 130 and err == "magicdec generate: interrupted"


def test_a_prompt_from_a_pipe_is_read(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """`--prompt-file <(cmd)` and /dev/stdin are pipes, not regular files: read them like files."""
    import os
    import threading

    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("It is a truth universally acknowledged"))
    writer.start()
    rc, err = run(capsys, "--prompt-file", str(fifo))
    writer.join()
    assert rc == 2 and "the path does not exist" in err  # read fine: only the (missing) model stops it
