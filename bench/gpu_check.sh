#!/usr/bin/env bash
# The GPU check: run right after cloning, on a machine with one H100/H200 (about 6-8 minutes):
#
#   bench/gpu_check.sh OUT_DIR
#
# 1. installs requirements.txt into .venv (as `make install` does); on a machine with an NVIDIA GPU whose torch
#    turns out to be a CPU build (e.g. a venv copied from a CPU machine, or a local CPU wheel picked by pip's
#    find-links), it replaces torch by the same version from TORCH_INDEX_URL (default: PyPI, whose Linux wheels
#    are CUDA builds; e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128), ignoring local pip config.
#    A CPU machine's install is left as it is. GPU_CHECK_SKIP_INSTALL=1 skips this step; PYTHON and VENV override
#    the interpreter that makes the venv and the venv's folder.
# 2. runs bench/gpu_check.py OUT_DIR: the tests marked gpu, Stage 1 tokens/s, bench/sweep.py at 512 x 4096 and
#    2048 x 32768 (tf32, bf16); writes OUT_DIR/results.md and OUT_DIR/results.json and prints the summary.
#    Without a GPU it runs the CPU-safe parts at a smoke size and says what it skipped.
# Exit status: 0 when every step ran (targets missed are reported, not failures), 1 when a step failed.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bench/gpu_check.sh OUT_DIR [bench/gpu_check.py flags: --smoke, --skip_tests, --budget_s S]" >&2
    exit 2
fi
OUT_DIR=$1
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt
    if has_gpu && ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
        pinned=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements.txt)
        echo "[gpu_check] an NVIDIA GPU is here but torch is a CPU build: installing the CUDA build of" \
             "torch==$pinned from $TORCH_INDEX_URL"
        "$VENV/bin/python" -m pip uninstall --quiet -y torch
        env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
            "$VENV/bin/python" -m pip install --quiet --index-url "$TORCH_INDEX_URL" "torch==$pinned"
        "$VENV/bin/python" -c 'import torch; assert torch.version.cuda, "still a CPU build of torch"'
    fi
    touch "$VENV/.installed"
fi
if has_gpu && ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "[gpu_check] warning: nvidia-smi sees a GPU but torch cannot use it (driver too old for this CUDA build?):" \
         "running the CPU-safe parts only" >&2
fi
exec "$VENV/bin/python" bench/gpu_check.py "$OUT_DIR" "$@"
