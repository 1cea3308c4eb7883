#!/usr/bin/env bash
# Multi-node training with torchrun. Run this same command on every node.
#
# usage: NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 launch/multi_node.sh recipe=NAME [hydra overrides...]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh recipe=stage1_pretrain data.root=/data
# env: NNODES (required), NODE_RANK (required), MASTER_ADDR (required), MASTER_PORT (default 29500),
#      NPROC_PER_NODE (default: number of visible GPUs, else 1), RDZV_ID (default: qwenvl),
#      RDZV_BACKEND (default c10d: dynamic rendezvous at MASTER_ADDR:MASTER_PORT, global ranks assigned in
#      joining order, NODE_RANK only checked; static: --master_addr/--master_port/--node_rank, node
#      NODE_RANK holds global ranks NODE_RANK*NPROC_PER_NODE..., node 0 hosts the store),
#      PYTHON, DRY_RUN=1 (print the command only).
# Every argument is passed to `python -m train` unchanged. output_dir must be on a filesystem every node
# sees (checkpoints are written collectively into one directory; rank 0 writes `latest`).
# Tested for real (not only DRY_RUN) by tests/test_multinode.py: two "nodes" on localhost, ZeRO-2, resume.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
  [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || NPROC_PER_NODE=1
fi
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NNODES" =~ ^[1-9][0-9]*$ ]] || (( NODE_RANK >= NNODES )); then
  echo "error: NODE_RANK=$NODE_RANK must be an integer in 0..NNODES-1 (NNODES=$NNODES)" >&2
  exit 2
fi
need_recipe "$@"

case "${RDZV_BACKEND:-c10d}" in
  c10d) rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-qwenvl}") ;;
  static) rdzv=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
  *) echo "error: RDZV_BACKEND=${RDZV_BACKEND} must be c10d or static" >&2; exit 2 ;;
esac

run_cmd "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" -m train "$@"
