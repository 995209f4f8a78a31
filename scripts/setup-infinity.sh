#!/usr/bin/env bash
# The peer of the embedding endpoint in benchmarks/search_latency.py: infinity-emb (a production
# embedding server) in its own venv, so its pins never meet the project's.
#
#   scripts/setup-infinity.sh [VENV]     (default: .retriever/peers/infinity-venv)
#
# torch goes in first from the local CPU wheel (torch==2.13.0, the project's own), so
# infinity-emb's torch requirement is already met and no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.retriever/peers/infinity-venv}"
if [ -x "$VENV/bin/infinity_emb" ]; then
  echo "infinity-emb is installed in $VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.13.0"
"$VENV/bin/pip" install --quiet "infinity-emb[server,torch]"
"$VENV/bin/infinity_emb" --help >/dev/null
echo "infinity-emb installed in $VENV"
