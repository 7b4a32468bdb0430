# The two commands a newcomer runs: `make demo` (install, then scan example images) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint typecheck clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The local CPU build first: a range alone would pull a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/synthguard demo $(ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy models db worker
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) synthguard.db
