"""Bad input as a new user gives it, at the command line (each case a real `magicdec` process) and in the Python
API: one line on stderr naming the problem and the flag or argument that fixes it, a non-zero exit status, no
traceback, and no file left behind (no empty or header-only results, no lock file). Most command-line cases
fail before any model loads; a Ctrl-C at any moment ends with one line too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from magicdec import Auto, DraftTuning, SamplingParams, SpecConfig

TINY = "{tiny}"  # replaced by the tiny random checkpoint's directory
SERVER = "{server}"  # replaced by the base URL of a tiny server that needs the API key KEY
KEY = "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def magicdec(*argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run `python -m magicdec argv` in `cwd`; (exit status, stderr)."""
    p = subprocess.run([sys.executable, "-m", "magicdec", *argv], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout)
    return p.returncode, p.stderr


def assert_one_line(rc: int, err: str, words: str, cwd: Path) -> None:
    lines = err.strip().splitlines()
    assert rc != 0, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert words in lines[0], err
    assert not any(cwd.iterdir()), f"left behind: {sorted(map(str, cwd.rglob('*')))}"


BENCH_SERVE = ("bench", "serve", "--requests", "1", "--prompt-len", "16", "--output-len", "2", "--quiet",
               "--tokenizer-model", TINY)
CASES: list[tuple[str, tuple[str, ...], dict[str, str], str]] = [
    # (name, argv, environment, words of the one line)
    ("serve-host-numbers", ("serve", "--model", TINY, "--host", "999.999.999.999"), {}, "--host 999.999.999.999"),
    ("serve-host-name", ("serve", "--model", TINY, "--host", "not_a_host!"), {}, "--host not_a_host!"),
    ("serve-host-elsewhere", ("serve", "--model", TINY, "--host", "192.0.2.1"), {},
     "--host 192.0.2.1: not an address of this machine"),
    ("serve-empty-key", ("serve", "--model", TINY, "--api-key", ""), {}, "API key (--api-key or $MAGICDEC_API_KEY) is "
     "empty"),
    ("serve-empty-key-env", ("serve", "--model", TINY), {"MAGICDEC_API_KEY": ""}, "is empty"),
    ("serve-guided-budget", ("serve", "--model", TINY, "--spec", "self", "--drafter", "guided", "--budget", "8"), {},
     "--budget ≥ 127"),
    ("serve-int4-no-spec", ("serve", "--model", TINY, "--draft-weights", "int4"), {},
     "--draft-weights would do nothing, as speculation is off"),
    ("bench-threads", ("bench", "--threads", "-3"), {}, "argument --threads: expected a positive whole number"),
    ("bench-trace-threads", ("bench", "trace", "--threads", "-3"), {}, "argument --threads"),
    ("bench-trace-threads-0", ("bench", "trace", "--threads", "0"), {}, "argument --threads"),
    ("bench-trace-concurrency", ("bench", "trace", "--concurrency", "0"), {}, "argument --concurrency"),
    ("bench-serve-concurrency", ("bench", "serve", "--concurrency", "0"), {}, "argument --concurrency"),
    ("bench-serve-rate", ("bench", "serve", "--rate", "0"), {}, "argument --rate"),
    ("bench-serve-requests", ("bench", "serve", "--requests", "0"), {}, "argument --requests"),
    ("generate-int4-no-spec", ("generate", "--model", TINY, "--prompt", "x", "--draft-weights", "int4"), {},
     "--draft-weights would do nothing"),
    ("generate-int4-spec-none", ("generate", "--model", TINY, "--prompt", "x", "--spec", "none", "--draft-weights",
                                 "int4"), {}, "--draft-weights would do nothing"),
    ("generate-budget-no-spec", ("generate", "--model", TINY, "--prompt", "x", "--budget", "64"), {},
     "--budget would do nothing"),
    ("generate-sinks-snapkv", ("generate", "--model", TINY, "--prompt", "x", "--spec", "self", "--drafter", "snapkv",
                               "--sinks", "4"), {}, "--sinks would do nothing"),
    ("generate-batch-prompt", ("generate", "--model", TINY, "--prompt", "x", "--batch", "4"), {},
     "--batch cuts prompts from a corpus"),
    ("generate-guided-budget", ("generate", "--model", TINY, "--prompt", "x", "--spec", "self", "--drafter", "guided",
                                "--budget", "8"), {}, "--budget ≥ 127"),
    ("bench-serve-nothing-listens", (*BENCH_SERVE, "--base-url", "http://127.0.0.1:{port}/v1"), {},
     "nothing answers at http://127.0.0.1:"),
    ("bench-serve-no-key", (*BENCH_SERVE, "--base-url", SERVER), {}, "give the server's key with --api-key"),
    ("bench-serve-wrong-key", (*BENCH_SERVE, "--base-url", SERVER, "--api-key", "wrong"), {},
     "the key given with --api-key is not the server's"),
    ("bench-serve-unknown-model", (*BENCH_SERVE, "--base-url", SERVER, "--api-key", KEY, "--model", "nope"), {},
     "check --model nope"),
    ("bench-serve-refused-body", (*BENCH_SERVE, "--base-url", SERVER, "--api-key", KEY, "--extra-body",
                                  '{"temperature": "hot"}'), {}, "fix the extra body of 'run'"),
]


@pytest.fixture(scope="module")
def tiny_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`magicdec serve` of the tiny checkpoint with an API key; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("tiny-server") / "log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "magicdec", "serve", "--model", str(tiny_dir), "--port",
                                 str(port), "--api-key", KEY], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def test_bad_command_lines_get_one_line_and_leave_nothing(tiny_dir: Path, tiny_server: str, tmp_path: Path) -> None:
    """Every case at once (they are processes: run a few side by side), each in its own empty folder."""
    busy = socket.socket()  # a port in use
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [*CASES, ("serve-port-in-use", ("serve", "--model", TINY, "--port", str(busy.getsockname()[1])), {},
                      f"--port {busy.getsockname()[1]}: 127.0.0.1:{busy.getsockname()[1]} is in use")]

    def run(case: tuple[str, tuple[str, ...], dict[str, str], str]) -> tuple[str, int, str, str, Path]:
        name, argv, env, words = case
        cwd = tmp_path / name
        cwd.mkdir()
        argv = tuple(a.replace(TINY, str(tiny_dir)).replace(SERVER, tiny_server).replace("{port}", str(free_port()))
                     for a in argv)
        rc, err = magicdec(*argv, cwd=cwd, env=env)
        return name, rc, err, words, cwd

    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(run, cases))
    finally:
        busy.close()
    failed = []
    for name, rc, err, words, cwd in results:
        try:
            assert_one_line(rc, err, words, cwd)
        except AssertionError as e:
            failed.append(f"{name}: {e}")
    assert not failed, "\n".join(failed)


def test_budget_is_cut_to_the_context_and_the_advised_minimum_runs(tiny_dir: Path, tmp_path: Path) -> None:
    """A SnapKV budget far past a short prompt is cut to its context, said in one line (no pool of 6 GB); the
    guided draft's least budget that the error advises is accepted."""
    rc, err = magicdec("generate", "--model", str(tiny_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "3",
                       "--spec", "self", "--drafter", "snapkv", "--budget", "100000", "--quiet", cwd=tmp_path)
    said = [line for line in err.splitlines() if not line.startswith("magicdec: ")]  # not the kernels' progress
    assert rc == 0 and said == ["magicdec generate: --budget 100000 is more than the longest context (6 tokens): "
                                "using --budget 6"], err
    rc, err = magicdec("generate", "--model", str(tiny_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "3",
                       "--spec", "self", "--drafter", "guided", "--budget", "127", "--quiet", cwd=tmp_path)
    assert rc == 0 and "budget" not in err and "Traceback" not in err, err


def interrupt(argv: list[str], cwd: Path, when: str | float) -> tuple[int, str]:
    """Start `magicdec argv`, send SIGINT after `when` seconds, or when `when` appears on stderr, or (`"ready"`)
    once the server's /health answers 200 (its port after --port); (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "magicdec", *argv], cwd=cwd, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    assert proc.stderr is not None
    if isinstance(when, float):
        time.sleep(when)
    elif when == "ready":
        port = argv[argv.index("--port") + 1]
        while proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
    else:
        for line in proc.stderr:
            err.append(line)
            if when in line:
                break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=180)[1]
    return proc.returncode, "".join(err) + rest


def clean_exit(rc: int, err: str) -> None:
    for bad in ("Traceback", "terminate called", "CancelledError", "Exception in"):
        assert bad not in err, err
    assert rc in (0, 130), err


@pytest.mark.parametrize("delay", [0.2, 1.0, 2.5])
def test_ctrl_c_while_starting_is_one_line(tiny_dir: Path, tmp_path: Path, delay: float) -> None:
    rc, err = interrupt(["generate", "--model", str(tiny_dir), "--prompt", "x"], tmp_path, delay)
    assert (rc, err.strip()) == (130, "magicdec generate: interrupted") or (rc == 0 and "Traceback" not in err), err


def test_ctrl_c_that_lands_in_a_finalizer_still_stops_the_command(tmp_path: Path) -> None:
    """An interrupt landing where Python cannot raise it (a weakref callback, as importlib's module locks have:
    "Exception ignored in ...") is not swallowed: the command stops there with the one line and status 130."""
    script = (
        "import signal, sys, weakref\n"
        "import magicdec.cli.main as cli\n"
        "class Held: pass\n"
        "def main(argv=None):\n"
        "    held = Held()\n"
        "    ref = weakref.ref(held, lambda r: signal.raise_signal(signal.SIGINT))\n"
        "    del held\n"
        "    print('ran on')\n"
        "    return 0\n"
        "cli.main = main\n"
        "sys.argv = ['magicdec', 'generate']\n"
        "cli.entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.strip(), done.stdout) == (130, "magicdec generate: interrupted", ""), done


def test_ctrl_c_while_the_model_loads_stops_cleanly(tmp_path: Path) -> None:
    """The built-in model loads for a few seconds behind the listening server: Ctrl-C then ends the process at once
    (no C++ abort of the loading thread at the interpreter's exit), repeatedly."""
    for _ in range(3):
        rc, err = interrupt(["serve", "--port", str(free_port())], tmp_path, "Application startup complete")
        clean_exit(rc, err)


def test_ctrl_c_on_a_ready_server_stops_cleanly(tiny_dir: Path, tmp_path: Path) -> None:
    for _ in range(3):
        rc, err = interrupt(["serve", "--model", str(tiny_dir), "--port", str(free_port())], tmp_path, "ready")
        clean_exit(rc, err)
        assert rc == 0, err


# ---- the Python API ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an integer, got 2.5 (float)"),
        ({"max_new_tokens": "4"}, TypeError, "max_new_tokens must be an integer, got '4' (str)"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an integer"),
        ({"top_k": 2.5}, TypeError, "top_k must be an integer"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number, got 'hot'"),
        ({"top_p": None}, TypeError, "top_p must be a number"),
        ({"seed": 1.5}, TypeError, "seed must be an integer or None, got 1.5"),
        ({"stop": [1, 2]}, TypeError, "stop must be a string or a list of strings"),
        ({"stop": 7}, TypeError, "stop must be a string or a list of strings"),
        ({"ignore_eos": "yes"}, TypeError, "ignore_eos must be True or False"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be ≥ 1"),
    ],
)
def test_sampling_params_check_types_at_construction(kwargs: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error) as e:
        SamplingParams(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sampling_params_normalize_what_they_accept() -> None:
    import numpy as np

    p = SamplingParams(max_new_tokens=np.int64(4), temperature=1, seed=np.int32(3), stop=["a", "b"])
    assert (type(p.max_new_tokens), type(p.temperature), type(p.seed), p.stop) == (int, float, int, ("a", "b"))
    assert SamplingParams(stop="x").stop == ("x",)


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: SpecConfig(method="self", budget=2.5), TypeError, "SpecConfig: budget must be an integer, got 2.5"),
        (lambda: SpecConfig(method="self", sinks="16"), TypeError, "SpecConfig: sinks must be an integer"),
        (lambda: SpecConfig(method="self", gamma=2.0), TypeError, "SpecConfig: gamma must be a positive integer"),
        (lambda: SpecConfig(method="self", gamma=True), TypeError, "SpecConfig: gamma must be a positive integer"),
        (lambda: SpecConfig(method=1), TypeError, "SpecConfig: method must be a string"),
        (lambda: SpecConfig(method="self", drafter=None), TypeError, "SpecConfig: drafter must be a string"),
        (lambda: SpecConfig(method="self", draft_weights=4), TypeError, "SpecConfig: draft_weights must be a string"),
        (lambda: SpecConfig(method="draft", draft_model=3), TypeError, "SpecConfig: draft_model must be a string"),
        (lambda: SpecConfig(method="self", tuning={"observe": 8}), TypeError, "SpecConfig: tuning must be a "
                                                                              "DraftTuning"),
        (lambda: DraftTuning(observe=2.5), TypeError, "DraftTuning: observe must be an integer"),
        (lambda: DraftTuning(snapkv_window="64"), TypeError, "DraftTuning: snapkv_window must be an integer"),
        (lambda: DraftTuning(pool_kernel=True), TypeError, "DraftTuning: pool_kernel must be an integer"),
        (lambda: DraftTuning(guided_window=1.5), TypeError, "DraftTuning: guided_window must be an integer or None"),
        (lambda: DraftTuning(kv_source=None), TypeError, "DraftTuning: kv_source must be a string"),
        (lambda: DraftTuning(guided_scores=1), TypeError, "DraftTuning: guided_scores must be a string"),
        (lambda: Auto(max_gamma=True), ValueError, "max_gamma"),
        (lambda: Auto(profile=3), TypeError, "Auto: profile must be a string or None"),
        (lambda: SpecConfig(draft_weights="int4"), ValueError, "add --spec self or drop --draft-weights"),
    ],
)
def test_spec_config_checks_every_field_at_construction(make: Any, error: type, words: str) -> None:
    with pytest.raises(error) as e:
        make()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_guided_min_budget_is_accepted_and_one_less_is_not() -> None:
    """The least budget the CLI advises satisfies every constraint of the guided draft (a sink block, a selected
    block and the window `min(snapkv_window, budget // 2)`)."""
    for tuning in (DraftTuning(), DraftTuning(snapkv_window=16), DraftTuning(guided_window=32)):
        spec = SpecConfig(method="self", drafter="guided", budget=512, tuning=tuning)
        least = spec.min_budget(64)
        ok = SpecConfig(method="self", drafter="guided", budget=least, tuning=tuning)
        assert ok.budget - ok.recent_window >= 64 + (64 if tuning.guided_window else 0)
        short = SpecConfig(method="self", drafter="guided", budget=least - 1, tuning=tuning)
        assert short.budget - short.recent_window < 64 + (64 if tuning.guided_window else 0)


# ---- files left behind ----------------------------------------------------------------------------------------

def test_a_run_that_measures_nothing_leaves_no_results_file(tmp_path: Path) -> None:
    from magicdec.bench.report import JsonlWriter

    w = JsonlWriter(tmp_path / "run" / "results.jsonl")
    w.write({"type": "header"})
    w.close()
    assert not (tmp_path / "run").exists()
    w = JsonlWriter(tmp_path / "run" / "results.jsonl")
    w.write({"type": "header"})
    w.write({"type": "point", "x": 1})
    w.close()
    assert (tmp_path / "run" / "results.jsonl").read_text().splitlines() == ['{"type": "header"}',
                                                                             '{"type": "point", "x": 1}']


def test_a_failed_conversion_leaves_no_lock_file(tmp_path: Path) -> None:
    from magicdec.loading.conversion import convert_once

    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise ValueError("not a GGUF file")

    dest = tmp_path / "gguf" / "model-abc"
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_once(dest, "weights", broken, "model.gguf")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_lock_files_exist_only_while_held(tmp_path: Path) -> None:
    import threading

    from magicdec.home.locks import exclusive

    path = tmp_path / "x.lock"
    order: list[str] = []
    with exclusive(path, lambda f: "waiting", remove=True) as f:
        assert f is not None and path.exists()

        def second() -> None:  # waits on the file the first holder removes: it must lock the new one
            with exclusive(path, lambda f: "waiting", remove=True):
                order.append("second")
                time.sleep(0.2)
                order.append("second done")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    with exclusive(path, lambda f: "waiting", remove=True):  # a third taker never overlaps the second
        order.append("third")
    t.join()
    assert not path.exists()
    assert order in (["first done", "second", "second done", "third"],  # one holder at a time
                     ["first done", "third", "second", "second done"]), order


def test_xdg_cache_home_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from magicdec.home.paths import magicdec_home

    monkeypatch.delenv("MAGICDEC_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert magicdec_home() == tmp_path / "xdg" / "magicdec"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the specification ignores a relative path
    assert magicdec_home() == Path("~/.cache/magicdec").expanduser()
    monkeypatch.setenv("MAGICDEC_HOME", str(tmp_path / "home"))  # MAGICDEC_HOME first
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert magicdec_home() == tmp_path / "home"
