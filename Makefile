# The two commands a newcomer runs: `make demo` (install, then scan example images) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
# Empty: pip's configured indexes. For PyTorch's CPU-only build elsewhere: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install demo test lint typecheck clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: pyproject's range alone would pull the newest release. On the development machines a CPU
	# build of this version lies in pip's local wheel folder (quick); from PyPI on Linux x86_64 it is the
	# multi-GB CUDA build unless TORCH_INDEX names the CPU index.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/synthguard demo $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy models db worker

test: lint typecheck
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) synthguard.db
