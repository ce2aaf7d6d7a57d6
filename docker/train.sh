#!/usr/bin/env bash
# The trainer service: `atlas-train fit` streaming from the shard server, resumable.
# One process when NNODES x GPUS is 1; torchrun otherwise. SIGTERM (docker stop) reaches the
# training processes, which save a checkpoint; a failure ends with its one-line error, last.
# Settings come from the environment (docker-compose.yml lists them with their defaults).
# TRAIN_DRY_RUN=1 prints the command instead of running it.
set -uo pipefail
model=${MODEL:-cnn3d-sym}
run=${RUNS_DIR:-/runs}/${RUN_NAME:-$model}
url=${SHARD_URL:-http://shard-server/}
url=${url%/}
args=(fit --shards "$url/train/" --val-shards "$url/val/" --out "$run" --model "$model"
      --epochs "${EPOCHS:-1}" --batch-size "${BATCH_SIZE:-256}" --recipe "${RECIPE:-modern}"
      --workers "${LOADER_WORKERS:-4}" --device "${DEVICE:-auto}" --resume)
[ -n "${LR:-}" ] && args+=(--lr "$LR")  # unset: the recipe's
[ -n "${STEPS_PER_EPOCH:-}" ] && args+=(--steps-per-epoch "$STEPS_PER_EPOCH")
[ -n "${VAL_BATCHES:-}" ] && args+=(--val-batches "$VAL_BATCHES")
[ -n "${EVAL_EVERY:-}" ] && args+=(--eval-every "$EVAL_EVERY")
[ -n "${CHECKPOINT_EVERY:-}" ] && args+=(--checkpoint-every "$CHECKPOINT_EVERY")
[ -n "${TRAIN_ARGS:-}" ] && read -r -a extra <<< "$TRAIN_ARGS" && args+=("${extra[@]}")
if [ "${NNODES:-1}" = 1 ] && [ "${GPUS:-1}" = 1 ]; then
  cmd=(atlas-train "${args[@]}")
else
  cmd=(torchrun "--nnodes=${NNODES:-1}" "--nproc_per_node=${GPUS:-1}" "--node_rank=${NODE_RANK:-0}"
       --rdzv_backend=c10d "--rdzv_endpoint=${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}"
       "--rdzv_id=${RUN_NAME:-$model}")
  # A node's own address; nodes on one host need different ones (their containers share hostname and PIDs)
  [ -n "${LOCAL_ADDR:-}" ] && cmd+=("--local-addr=$LOCAL_ADDR")
  cmd+=(-m trainer.cli "${args[@]}")
fi
if [ -n "${TRAIN_DRY_RUN:-}" ]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi
echo "trainer: ${cmd[*]}"
log=$(mktemp)
"${cmd[@]}" > >(tee -a "$log") 2> >(tee -a "$log" >&2) &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
status=$?
while kill -0 "$pid" 2>/dev/null; do  # the wait was cut short by the trap: wait for the checkpoint
  wait "$pid"
  status=$?
done
if [ "$status" -ne 0 ]; then
  error=$(grep -aE '(^|\]:)Error: ' "$log" | head -1 | sed -E 's/^\[[^]]*\]://')  # the first: the root cause
  echo "trainer: exit status $status${error:+: $error}" >&2
fi
exit "$status"
