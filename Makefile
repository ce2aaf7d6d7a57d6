# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-out
WORKERS ?= 2

.PHONY: install test demo bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned: these builds lie on the machines' disk; a bare
	# `torch` requirement would download several GB.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	@echo "== 1/3 synthesise a phantom ATLAS v2.0 release (24 subjects) =="
	$(VENV)/bin/atlas-shards synth $(DEMO)/release --layout r2.0 --subjects 24 --seed 0 --workers $(WORKERS)
	@echo "== 2/3 ingest it into a Zarr store =="
	$(VENV)/bin/atlas-shards ingest $(DEMO)/release $(DEMO)/store.zarr --workers $(WORKERS)
	@echo "== 3/3 exploratory figures =="
	$(VENV)/bin/atlas-shards eda $(DEMO)/store.zarr $(DEMO)/eda
	@echo "demo done: store $(DEMO)/store.zarr, report $(DEMO)/store.zarr/ingest-report.csv, figures $(DEMO)/eda/"

clean:
	rm -rf $(DEMO) .pytest_cache

bench: $(STAMP)
	$(PY) bench/bench_synth_ingest.py --subjects 8 --workers $(WORKERS)
