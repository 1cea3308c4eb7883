#!/usr/bin/env bash
# Multi-node training with torchrun (c10d rendezvous). Run this same command on every node.
#
# usage: NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 launch/multi_node.sh recipe=NAME [hydra overrides...]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh recipe=stage1_pretrain data.root=/data
# env: NNODES (required), NODE_RANK (required), MASTER_ADDR (required), MASTER_PORT (default 29500),
#      NPROC_PER_NODE (default: number of visible GPUs, else 1), RDZV_ID (default: qwenvl),
#      PYTHON, DRY_RUN=1 (print the command only).
# Every argument is passed to `python -m train` unchanged. output_dir must be on a filesystem every node
# sees (checkpoints are written collectively into one directory; rank 0 writes `latest`).
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
need_recipe "$@"

run_cmd "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id "${RDZV_ID:-qwenvl}" -m train "$@"
