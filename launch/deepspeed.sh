#!/usr/bin/env bash
# Training through the `deepspeed` launcher (pdsh/ssh to the hosts of a hostfile, or one node).
# The launcher appends --local_rank=K; `python -m train` strips it before Hydra sees argv.
#
# usage: launch/deepspeed.sh HOSTFILE recipe=NAME [hydra overrides...]      # multi-node, hostfile lines: "host slots=8"
#        launch/deepspeed.sh none recipe=NAME [hydra overrides...]          # this node only (NUM_GPUS processes)
#   launch/deepspeed.sh hosts.txt recipe=stage3_sft data.root=/data engine=zero3
# env: NUM_GPUS (single node only; default all visible), MASTER_ADDR / MASTER_PORT (default: first host / 29500),
#      INCLUDE (e.g. "node1:0,1@node2"), PYTHON, DRY_RUN=1 (print the command only).
# The recipe must use a DeepSpeed engine (engine=zero1|zero2|zero3); all arguments after HOSTFILE are
# passed to `python -m train` unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 2 ]]; then
  sed -n '2,12p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
HOSTFILE="$1"
shift
need_recipe "$@"

args=()
if [[ "$HOSTFILE" != "none" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "error: hostfile $HOSTFILE not found" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE")
  first_host="$(grep -v '^[[:space:]]*#' "$HOSTFILE" | awk 'NF {print $1; exit}')"
  args+=(--master_addr "${MASTER_ADDR:-$first_host}")
else
  [[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
  [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
fi
args+=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${INCLUDE:-}" ]] && args+=(--include "$INCLUDE")

# the launcher script installed next to the interpreter; it runs `python -m train` on every slot
run_cmd "$(dirname "$PYTHON")/deepspeed" "${args[@]}" --module train "$@"
