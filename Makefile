# dinoserve: `make serve` and `make test` work on a fresh clone with nothing else installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install only when the dependency list changes: a second run costs seconds.
STAMP := $(VENV)/.installed
DINOSERVE_PORT ?= 8080
PORT ?= $(DINOSERVE_PORT)
HOST ?= 127.0.0.1
# The demo bundle is committed (exported from demo/dinoserve-demo.pth), so `make serve` needs no export.
REPOSITORY ?= demo/model_repository
MODEL ?= dinoserve-demo
DEMO_CHECKPOINT := demo/dinoserve-demo.pth
BUNDLE := $(REPOSITORY)/$(MODEL)/1/model.onnx
PYTEST_ARGS ?=
# The demo page's browser test drives Debian's chromium (Playwright downloads no browser here).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install test serve bundle demo-model demo-screenshot clean

install: $(STAMP)

# torch and torchvision (pinned once, in pyproject.toml) go in first and alone: resolved together with
# everything else they take minutes longer. No byte-compiling: Python compiles what it imports.
TORCH_PINS := $(shell grep -oE '"torch(vision)?==[0-9.]+"' pyproject.toml | tr -d '"')

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[all,test]'
	@touch $@

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

bundle: $(BUNDLE)

$(BUNDLE): | $(STAMP)
	$(BIN)/dinoserve export $(DEMO_CHECKPOINT) --repository $(REPOSITORY) --name $(MODEL)

serve: $(STAMP) $(BUNDLE)
	$(BIN)/dinoserve serve --repository $(REPOSITORY) --model $(MODEL) --host $(HOST) --port $(PORT)

# Rebuilds the committed demo checkpoint and bundle exactly as described in the README (docs/training.md).
demo-model: $(STAMP)
	$(BIN)/dinoserve train --config demo/train.toml --output runs/demo
	cp runs/demo/teacher_backbone.pth $(DEMO_CHECKPOINT)
	rm -rf demo/model_repository/dinoserve-demo  # a new architecture cannot join the old one's versions
	$(BIN)/dinoserve export $(DEMO_CHECKPOINT) --repository demo/model_repository --name dinoserve-demo --version 1

# Re-takes docs/demo-page.png, the README's picture of the demo page, from the demo bundle.
demo-screenshot: $(STAMP) $(CHROMIUM)
	$(BIN)/python demo/screenshot.py

clean:
	rm -rf $(REPOSITORY) runs .pytest_cache
