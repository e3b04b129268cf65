"""The product/lab seam: serving needs none of the lab's packages (`pip install magicdec` without extras),
and a lab command run without them says which extra to install in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port

LAB = ("matplotlib", "rdata", "httpx", "datasets")
# a Python that cannot import the lab's packages, as after `pip install magicdec` without extras
WITHOUT_LAB = f"import sys, runpy; sys.modules.update(dict.fromkeys({LAB!r})); sys.argv[0] = 'magicdec'; " \
              "runpy.run_module('magicdec', run_name='__main__', alter_sys=True)"


def test_the_product_imports_nothing_of_the_lab() -> None:
    code = ("import sys; import magicdec, magicdec.server.app, magicdec.cli.serve, magicdec.llm, magicdec.serving; "
            "print([m for m in sys.modules if m.split('.')[0] in " + repr(LAB) +
            " or m.startswith('magicdec.bench')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_serving_runs_without_the_lab_extra(tiny_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    argv = ["serve", "--model", str(tiny_dir), "--port", str(port), "--device", "cpu", "--num-blocks", "64"]
    proc = subprocess.Popen([sys.executable, "-c", WITHOUT_LAB, *argv], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        body = json.dumps({"model": tiny_dir.name, "prompt": "w1 w2 w3", "max_tokens": 4, "temperature": 0})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert answer["usage"]["completion_tokens"] == 4, answer
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    assert "Traceback" not in err, err


def test_a_lab_command_without_the_lab_extra_says_which_to_install(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", WITHOUT_LAB, "plan", "--model", "llama-3.1-8b", "--png",
                          str(tmp_path / "plan.png")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("magicdec plan: error: this needs matplotlib, which serving does "
                                                   "not: pip install 'magicdec[lab]'"), out.stderr
    assert not (tmp_path / "plan.png").exists()
