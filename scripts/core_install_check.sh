#!/usr/bin/env bash
# A fresh venv with only the core install (no extras): `progan run` on the demo config
# works, and `progan export --format onnx` fails in one line naming the [export] extra.
#   scripts/core_install_check.sh [VENV_DIR] [WORK_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/progan-core-venv}
work=${2:-/tmp/progan-core-work}
rm -rf "$work" && mkdir -p "$work"
if [ "${REUSE_VENV:-0}" != 1 ]; then  # REUSE_VENV=1: the venv of an earlier check
  rm -rf "$venv"
  start=$(date +%s)
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "$repo"
  echo "core install: $(( $(date +%s) - start )) s"
fi
# the extras' packages are absent (scipy is not checked: mlflow itself requires it)
for m in onnx onnxruntime onnxscript av optuna pytest; do
  if "$venv/bin/python" -c "import $m" 2>/dev/null; then echo "unexpected: $m installed"; exit 1; fi
done
cp -r "$repo/conf" "$work/"
cd "$work"
start=$(date +%s)
"$venv/bin/progan" run conf/demo.yaml --run-id core
echo "progan run conf/demo.yaml: $(( $(date +%s) - start )) s"
set +e
"$venv/bin/progan" export runs/core/generator.pt --format onnx --out g.onnx > export.txt 2>&1
code=$?
set -e
cat export.txt
echo "export exit code: $code"
test "$code" -ne 0 && test "$(grep -c . export.txt)" -eq 1 && grep -q "progan-pipeline\[export\]" export.txt
echo "core install check: ok"
