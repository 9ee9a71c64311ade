# The two commands of the README: `make train` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
TRAIN_ARGS ?=

.PHONY: setup train test clean

setup:
	@bash scripts/setup.sh

# Preprocess the bundled corpus into token shards (cached in data_cache/) and train the tiny model on CPU.
train: setup
	$(PY) -m deltatron.data.preprocess
	$(PY) -m deltatron.train $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf data_cache runs .pytest_cache
