# Two commands for a newcomer: `make run` and `make test`. Both set up whatever is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)

# Offline by default: nothing may reach a model hub, and no tool phones home.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export BENTOML_HOME := $(CURDIR)/work/bentoml
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CACARA_WEIGHTS_DIR := $(CURDIR)/work/weights

.PHONY: setup data run test repro summary clean help image image-cuda serve browser

help:
	@echo "make run   - set up, restore the demo corpus (dvc pull), run the pipeline (dvc repro), print results"
	@echo "make test  - set up, restore the demo corpus, run the test suite"
	@echo "make serve - serve the last packaged model on 127.0.0.1:PORT (default 3000; make serve PORT=8080)"
	@echo "make image - build the CPU image with buildah (make image-cuda: the CUDA image for training)"

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c requirements.lock -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

# The demo corpus lives in the DVC remote committed inside the repo (dvc-remote/): no network needed.
data: setup
	$(BIN)/dvc pull --quiet data.dvc

repro: data
	$(BIN)/dvc repro

summary: setup
	$(BIN)/cacara summary

run: repro summary

test: data browser
	$(BIN)/python -m pytest

# The search page test drives Debian's chromium through playwright (no browser is downloaded).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "chromium is missing (sudo apt-get install chromium): the search page test will be skipped"

# The model and Bento the last `make run` packaged (work/package/package.json), on loopback; the drift
# features of audio requests go to work/serving_log (`cacara drift --current work/serving_log`; DRIFT_LOG= turns it off).
PORT ?= 3000
DRIFT_LOG ?= $(CURDIR)/work/serving_log
serve: setup
	CACARA_DRIFT_LOG_DIR=$(DRIFT_LOG) $(BIN)/cacara serve --port $(PORT)

# Images: buildah on a base made from Debian's packages (no registry needed); see scripts/build_image.sh.
image: data
	scripts/build_image.sh cpu

image-cuda: data
	scripts/build_image.sh cuda

clean:
	rm -rf work reports
