# Shared set-up for scripts/*.sh: a venv with fedhf installed, and the environment fedhf runs in.
# Sourced, not run. Creates .venv (or $FEDHF_VENV) if absent; reinstalls when pyproject.toml changes.
set -euo pipefail
FEDHF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDHF_VENV:-$FEDHF_ROOT/.venv}"
PY="${FEDHF_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[fedhf] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fedhf-installed"
if [ ! -f "$stamp" ] || [ "$FEDHF_ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[fedhf] installing fedhf and its dependencies into $VENV (torch pinned to the CPU build 2.13.0)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e "$FEDHF_ROOT[offline,test,export]"
  touch "$stamp"
fi

# Local copies of the preset datasets: $FEDHF_DATA_DIR, else ../shared/data beside the checkout.
if [ -z "${FEDHF_DATA_DIR:-}" ] && [ -d "$FEDHF_ROOT/../shared/data" ]; then
  FEDHF_DATA_DIR="$(cd "$FEDHF_ROOT/../shared/data" && pwd)"
  echo "[fedhf] FEDHF_DATA_DIR not set; using local datasets in $FEDHF_DATA_DIR" >&2
fi
[ -n "${FEDHF_DATA_DIR:-}" ] && export FEDHF_DATA_DIR

# No telemetry; Flower's SuperLink must not install the app's dependencies (multi-GB CUDA torch).
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PATH="$VENV/bin:$PATH"
