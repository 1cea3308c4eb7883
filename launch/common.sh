# Shared helpers for the launch scripts (sourced, not run).
# DRY_RUN=1 prints the final command instead of running it (used by tests/test_launch.py).
# PYTHON picks the interpreter (default: the repo's .venv if present, else python3).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

run_cmd() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    cd "$REPO_ROOT"
    exec "$@"
  fi
}

need_recipe() {
  local a
  for a in "$@"; do [[ "$a" == recipe=* ]] && return 0; done
  echo "error: pass recipe=NAME (see recipes/) followed by any Hydra overrides" >&2
  exit 2
}
