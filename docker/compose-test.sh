#!/usr/bin/env bash
# `make compose-test`: the service stack run for real on a small phantom, with a real Docker engine.
#   builds the image; synth -> ingest -> build -> nginx -> trainer (streams over HTTP) -> evaluator;
#   `docker stop`s the trainer mid-run (SIGTERM: a checkpoint) and runs the stack again (it resumes);
#   runs it a third time (a finished run: nothing to do); runs two training nodes of
#   docker-compose.node.yml on this host (torchrun over TCP, gloo) from the stack's shard server;
#   checks the outputs' owner (HOST_UID) and
#   nginx's access log; prints the evaluator's summary (the Dice).
# Compose v2 (`docker compose`) or v1 (`docker-compose`), whichever is installed. With no engine
# reachable it says so and exits 0. Not part of `make test` (CI has no engine).
# Settings: COMPOSE_TEST_DIR (default: a new temporary folder), TORCH_VARIANT (cuda|cpu), KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "compose-test: no Docker engine reachable (docker info failed): nothing run"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "compose-test: neither 'docker compose' nor 'docker-compose' is installed: nothing run"
  exit 0
fi
echo "compose-test: $("${compose[@]}" version | head -1)"

work=${COMPOSE_TEST_DIR:-$(mktemp -d /tmp/atlas-compose-test.XXXXXX)}
export COMPOSE_PROJECT_NAME=atlas-compose-test
export HOST_UID=${HOST_UID:-4242} HOST_GID=${HOST_GID:-4242}  # not root: the outputs must belong to this user
export DATA_HOST_DIR=$work/data RELEASE_HOST_DIR=$work/data SHARDS_HOST_DIR=$work/shards
export RUNS_HOST_DIR=$work/runs REPORTS_HOST_DIR=$work/reports
export SHARD_PORT=${SHARD_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export SUBJECTS=8 WORKERS=2 LESION_RATE=0.2 VAL_NATURAL_RATE=0.002 SHARD_SIZE_MB=16
export MODEL=cnn3d-sym STEPS_PER_EPOCH=200 BATCH_SIZE=64 LR=1e-4 LOADER_WORKERS=1 VAL_BATCHES=4 EVAL_EVERY=100
export CHECKPOINT_EVERY=1000  # only the SIGTERM save can make the checkpoint the restart resumes from
mkdir -p "$DATA_HOST_DIR" "$SHARDS_HOST_DIR" "$RUNS_HOST_DIR" "$REPORTS_HOST_DIR"
[ "$(id -u)" = 0 ] && chown -R "$HOST_UID:$HOST_GID" "$work"
run=$RUNS_HOST_DIR/$MODEL

c() { "${compose[@]}" "$@"; }
# the whole log first: grep -q may stop reading early, and pipefail would then count the writer's SIGPIPE
logged() { local text; text=$(c logs --no-color "$1"); grep -qF "$2" <<< "$text"; }
cleanup() {
  c down --remove-orphans >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "compose-test: FAILED: $*" >&2; c logs --no-color --tail=40 >&2 || true; exit 1; }

echo "== build the image (once, for every project service) =="
c build
echo "== a phantom release of $SUBJECTS subjects =="
c --profile phantom run --rm synth

echo "== the stack up to training; docker stop the trainer mid-run =="
c up -d trainer
for _ in $(seq 600); do
  [ -f "$run/metrics.csv" ] && [ "$(tail -1 "$run/metrics.csv" | cut -d, -f1)" -ge 10 ] 2>/dev/null && break
  sleep 1
done
[ -f "$run/metrics.csv" ] || fail "the trainer wrote no metrics.csv in 10 minutes"
c stop trainer
logged trainer "interrupted at step" || fail "no checkpoint message after SIGTERM"
[ -f "$run/last.pt" ] || fail "docker stop left no checkpoint"

echo "== run 1 (one shot): the trainer resumes, then the evaluator; its exit status is the run's =="
c run --rm evaluator || fail "the evaluator failed"
logged trainer "resuming /runs/$MODEL at step" || fail "the restarted trainer did not resume"

echo "== run 2: the finished run is a no-op, the evaluator runs again =="
c run --rm evaluator || fail "the second run failed"
logged trainer "already finished" || fail "the second run trained again"

echo "== two training nodes (docker-compose.node.yml, host network) streaming from this stack's shard server =="
node() {  # node RANK: one node's trainer, its own project name and runs folder
  mkdir -p "$work/nodes/$1" && chown "$HOST_UID:$HOST_GID" "$work/nodes/$1"
  COMPOSE_PROJECT_NAME=atlas-compose-test-node$1 RUNS_HOST_DIR=$work/nodes/$1 NODE_RANK=$1 LOCAL_ADDR=127.0.0.$(($1 + 1)) \
    "${compose[@]}" -f docker-compose.node.yml up --no-build --abort-on-container-exit --exit-code-from trainer
}
export SHARD_URL=http://127.0.0.1:$SHARD_PORT/ NNODES=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((SHARD_PORT + 1))
export GPUS=1 DEVICE=cpu STEPS_PER_EPOCH=20 LOADER_WORKERS=0 VAL_BATCHES=2 EVAL_EVERY=10 RUN_NAME=two-nodes
node 1 > "$work/node1.log" 2>&1 &
node1=$!
node 0 > "$work/node0.log" 2>&1 || { cat "$work/node0.log" >&2; fail "node 0 failed"; }
wait "$node1" || { cat "$work/node1.log" >&2; fail "node 1 failed"; }
[ -f "$work/nodes/0/two-nodes/ranks.json" ] || fail "no ranks.json from node 0"
python3 - "$work/nodes/0/two-nodes/ranks.json" <<'PY' || fail "the two nodes disagree"
import json, sys
audit = json.load(open(sys.argv[1]))
assert audit["world_size"] == 2 and audit["identical_parameters"] and audit["samples_seen_by_two_ranks"] == 0, audit
print(f"two nodes: world size 2, identical parameters, {audit['samples_compared_per_rank']} samples a rank, none shared")
PY
for n in 0 1; do COMPOSE_PROJECT_NAME=atlas-compose-test-node$n "${compose[@]}" -f docker-compose.node.yml down >/dev/null 2>&1; done
c stop

report=$REPORTS_HOST_DIR/$MODEL-test  # the evaluator scores the test split, the rule chosen on val
[ -f "$report/metrics.json" ] || fail "no evaluator report at $report"
owners=$(find "$work" -mindepth 2 ! -user "$HOST_UID" | head -3)
[ -z "$owners" ] || fail "outputs not owned by HOST_UID $HOST_UID: $owners"
requests=$(c logs --no-color shard-server | grep -c '"GET /train/' || true)
[ "$requests" -gt 0 ] || fail "nginx logged no shard requests"
curl -fsS "http://127.0.0.1:$SHARD_PORT/healthz" >/dev/null 2>&1 && fail "the shard server still answers after stop"

echo "== the evaluator's summary =="
python3 - "$report/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{m['model']} on {m['n_subjects']} {m['split']} scans: mean Dice {m['mean_dice']:.3f}, "
      f"pooled Dice {m['pooled_dice']:.3f}, mean lesion F1 {m['mean_lesion_f1']:.3f}, threshold {m['threshold']}")
PY
echo "nginx served $requests shard requests; outputs owned by $HOST_UID:$HOST_GID"
echo "compose-test: passed"
