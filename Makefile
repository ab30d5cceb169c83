# visionloop — the two commands a newcomer needs:
#   make run    create .venv, install the pinned dependencies, run the whole loop on the embedded digits,
#               then serve the champion on http://127.0.0.1:8000 until Ctrl-C
#   make test   same install, then lint and the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run serve demo test lint format install clean bench help

help:
	@echo "make run    - install (first time), run ingest→…→promote on the built-in digits, serve the champion"
	@echo "make serve  - serve the current champion on http://127.0.0.1:8000 (Ctrl-C stops it)"
	@echo "make demo   - the closed loop end to end: drift, retrain, promotion, rollback (a few minutes)"
	@echo "make test   - install (first time), ruff, then the whole pytest suite"
	@echo "make images - build the serving and training images (deploy/docker) and print their sizes"
	@echo "make bench  - run the benchmarks in benchmarks/ (drift.py alone takes about 11 minutes)"
	@echo "make clean  - remove .venv and the local project data (.visionloop/)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/visionloop run $(ARGS)
	$(BIN)/visionloop serve

demo: $(STAMP)
	$(BIN)/visionloop demo $(ARGS)

serve: $(STAMP)
	$(BIN)/visionloop serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# two pytest-xdist workers: much of the suite waits on real servers, Prometheus and Docker builds, so two workers on
# two cores finish sooner; tests/conftest.py keeps each file (and the files that use Docker) on one worker.
# PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# the serving and the training image (deploy/docker/): wheels on this machine, then docker build offline, then sizes.
# Where no public registry is reachable: `$(BIN)/visionloop images base` first, then make images BASE_IMAGE=visionloop-base:bookworm
.PHONY: images
images: $(STAMP)
	$(BIN)/visionloop images wheelhouse --kind all
	$(BIN)/visionloop images build --kind all $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))
	$(BIN)/visionloop images sizes

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/drift.py
	$(BIN)/python benchmarks/loop.py

clean:
	rm -rf $(VENV) .visionloop
