#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine N gloo processes) through torchrun.
#
# usage: launch/single_node.sh NPROC recipe=NAME [hydra overrides...]
#   launch/single_node.sh 8 recipe=stage2_multitask data.root=/data/shards
#   launch/single_node.sh 1 recipe=demo_stage1                      # one process, no DeepSpeed needed
# env: PYTHON, DRY_RUN=1 (print the command only). torchrun --standalone picks a free rendezvous port.
# Everything after NPROC is passed to `python -m train` unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 2 ]]; then
  sed -n '2,8p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
NPROC="$1"
shift
need_recipe "$@"

if [[ "$NPROC" == "1" ]]; then
  run_cmd "$PYTHON" -m train "$@"
else
  run_cmd "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    -m train "$@"
fi
