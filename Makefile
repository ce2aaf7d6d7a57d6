# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-out
WORKERS ?= 2
LADDER ?= ladder-out
BUDGET ?= 20

.PHONY: install constraints test test-isa lint demo bench ladder clean compose-test compose-up

# TORCH=cuda (default: PyPI's torch, a CUDA build that also runs on the CPU, ~5.5 GB) or TORCH=cpu (PyTorch's
# CPU wheels from download.pytorch.org, ~0.2 GB, for CPU-only machines).
TORCH ?= cuda

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned: these builds lie on the machines' disk; a bare
	# `torch` requirement would download several GB.
	case "$(TORCH)" in \
	  cuda) index="" ;; \
	  cpu) index="--index-url https://download.pytorch.org/whl/cpu" ;; \
	  *) echo "TORCH must be cuda or cpu, not $(TORCH)" >&2; exit 1 ;; \
	esac; \
	$(PY) -m pip install -q $$index torch==2.14.1 torchvision==0.29.1
	# every other package at the version the tests passed with (constraints.txt)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# After a green `make test`: record the versions of .venv as the tested ones.
constraints: $(STAMP)
	{ head -2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|torchvision|nvidia-|triton)=='; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

# tests/no_leftovers.py: fails, naming them, if any process the suite started outlives it.
test: $(STAMP)
	$(PY) tests/no_leftovers.py $(PY) -m pytest -q --durations=15

# The tests that compare floats (-m floats), again with PyTorch's and oneDNN's kernels capped at AVX2: what a CPU
# without AVX-512 or bf16 instructions computes (tests/conftest.py keeps torch.compile's cache apart for it).
test-isa: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) tests/no_leftovers.py $(PY) -m pytest -q -m floats

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	@echo "== 1/7 synthesise a phantom ATLAS v2.0 release (24 subjects) =="
	$(VENV)/bin/atlas-shards synth $(DEMO)/release --layout r2.0 --subjects 24 --seed 0 --workers $(WORKERS)
	@echo "== 2/7 ingest it into a Zarr store =="
	$(VENV)/bin/atlas-shards ingest $(DEMO)/release $(DEMO)/store.zarr --workers $(WORKERS)
	@echo "== 3/7 exploratory figures =="
	$(VENV)/bin/atlas-shards eda $(DEMO)/store.zarr $(DEMO)/eda
	@echo "== 4/7 balanced training shards, the default recipe: sampling by lesion (3000 samples a lesion, 43.7% lesion), as 32^3 blocks =="
	$(VENV)/bin/atlas-shards build $(DEMO)/store.zarr $(DEMO)/shards/train --split train --shard-size-mb 64 --workers $(WORKERS)
	@echo "== 5/7 un-upsampled validation stream (0.2% of brain voxels) =="
	$(VENV)/bin/atlas-shards build $(DEMO)/store.zarr $(DEMO)/shards/val --split val --natural 0.002 --shard-size-mb 64 --workers $(WORKERS)
	$(VENV)/bin/atlas-shards inspect $(DEMO)/shards/train --verify
	@echo "== 6/7 serve the shards over HTTP, train cnn3d-sym streaming from it (200 steps, the modern recipe: batch norm, lr 1e-3, bf16 where it pays) =="
	rm -rf $(DEMO)/runs/cnn3d-sym $(DEMO)/server-url
	$(VENV)/bin/atlas-shards serve $(DEMO)/shards --port 0 --ready-file $(DEMO)/server-url & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT; \
	for i in $$(seq 100); do [ -s $(DEMO)/server-url ] && break; sleep 0.2; done; \
	url=$$(cat $(DEMO)/server-url); echo "training from $$url/train/"; \
	$(VENV)/bin/atlas-train fit --shards $$url/train/ --val-shards $$url/val/ --out $(DEMO)/runs/cnn3d-sym \
		--model cnn3d-sym --steps-per-epoch 200 --batch-size 64 --val-batches 40 --workers 1
	@echo "== 7/7 evaluate it on the whole test volumes, the rule chosen on validation (dense inference, ATLAS challenge metrics) =="
	$(VENV)/bin/atlas-evaluate run --model $(DEMO)/runs/cnn3d-sym --store $(DEMO)/store.zarr --out $(DEMO)/reports/cnn3d-sym
	$(VENV)/bin/atlas-evaluate compare $(DEMO)/reports/cnn3d-sym --out $(DEMO)/reports/ladder.md
	@echo "== and segment the release's unlabelled Testing scans (masks on their own grids, nothing scored) =="
	$(VENV)/bin/atlas-evaluate segment --model $(DEMO)/runs/cnn3d-sym --store $(DEMO)/store.zarr \
		--out $(DEMO)/segmented --rule-from $(DEMO)/reports/cnn3d-sym
	@echo "demo done: store $(DEMO)/store.zarr, report $(DEMO)/store.zarr/ingest-report.csv, figures $(DEMO)/eda/,"
	@echo "           shards $(DEMO)/shards/train and $(DEMO)/shards/val (manifest.json in each),"
	@echo "           run $(DEMO)/runs/cnn3d-sym (metrics.csv, curves.png, last.pt),"
	@echo "           evaluation $(DEMO)/reports/cnn3d-sym/report.md (metrics.json, subjects.csv, masks/),"
	@echo "           masks of the unlabelled scans $(DEMO)/segmented/masks/ (predictions.csv)"

clean:
	rm -rf $(DEMO) bench-out $(LADDER) .pytest_cache

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/bench_synth_ingest.py --subjects 8 --workers $(WORKERS)
	$(PY) bench/bench_shards.py --subjects 8 --workers $(WORKERS) --out bench-out
	$(PY) bench/bench_blocks.py --subjects 16 --workers $(WORKERS) --out bench-out/blocks
	$(PY) bench/bench_stages.py --subjects 8 --workers $(WORKERS) --out bench-out/stages
	$(PY) bench/bench_train.py --shards bench-out/shards-16 --out bench-out
	$(PY) bench/bench_dense.py --shards bench-out/blocks/full-blocks
	$(PY) bench/bench_batch_mix.py bench-out/blocks/full-blocks --out bench-out/batch_mix.json
	$(PY) bench/bench_fit_alloc.py bench-out/blocks/full-blocks --budget 1 --out bench-out/fit_alloc.json
	$(PY) bench/bench_evaluate.py --store bench-out/store-16.zarr --out bench-out

# The paper's model ladder measured on a 50-subject phantom (24/8/8): BUDGET CPU-minutes of training a model
# (about 2 hours on 2 cores at the default 20); resumable. See bench/ladder.py and BENCHMARKS.md.
ladder: $(STAMP)
	$(PY) bench/ladder.py --out $(LADDER) --budget $(BUDGET)

# The service stack for real (a Docker engine; not part of `make test`): see docker/compose-test.sh.
compose-test:
	bash docker/compose-test.sh

# The stack once, end to end, on the phantom: returns the evaluator's exit status.
compose-up:
	docker compose version >/dev/null 2>&1 && c="docker compose" || c="docker-compose"; \
	$$c build && $$c --profile phantom run --rm synth && $$c run --rm evaluator; status=$$?; $$c stop; exit $$status
