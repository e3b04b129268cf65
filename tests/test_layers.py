"""The package's layer order holds (import-linter's contract in pyproject.toml) and no module imports
itself back through others (no cycle, lazy imports inside functions included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("magicdec")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.find_shortest_chain(importer=imported, imported=module):
                # a package's __init__ re-exporting its own modules is not a cycle between files
                if not (module.startswith(imported + ".") or imported.startswith(module + ".")):
                    cycles.append((module, imported))
    assert not cycles, cycles
