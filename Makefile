# Two commands: `make quickstart` (set up + run the main job on the embedded model) and `make test`.
# A second run reuses .venv and starts in seconds.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python's default native build can crash with "Illegal instruction" on CPUs whose
# extensions (e.g. AMX) differ from what the build probes; a portable build avoids it.
# Override with e.g. `make quickstart CMAKE_ARGS="-DGGML_NATIVE=ON"` (or -DGGML_CUDA=on).
CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export CMAKE_ARGS
# pip caches the built wheel; a non-default CMAKE_ARGS must not reuse the default build.
PIP_NO_CACHE := $(if $(filter -DGGML_NATIVE=OFF,$(CMAKE_ARGS)),,--no-cache-dir)
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-local-train-dev

.PHONY: quickstart test lint bench setup clean browser docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install $(PIP_NO_CACHE) -c constraints.txt -e '.[local,train,dev]'
	touch $@

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/cai run recipes/quickstart.yaml

# The evaluation report is checked in a real headless browser: Debian's chromium, installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium could not be installed; the report rendering test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check cai_async backends tests bench
	$(BIN)/mypy

# The docs site (mkdocs.yml, docs/) into site/; the configuration and CLI references are generated from the code
# as it builds (docs/hooks.py). NO_MKDOCS_2_WARNING silences Material's banner about MkDocs 2.0.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/engine_bench.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache
