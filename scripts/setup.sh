#!/usr/bin/env bash
# Sets up a fresh clone: a virtual environment in .venv with torch and the test/bench tools,
# then builds rmsprop_fused (C++ CPU kernel, and the CUDA kernel when nvcc is found) into the
# checkout itself, as an editable install.
# Run by scripts/main.sh and scripts/test.sh; safe to run again (it reuses what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
DEFAULT_TORCH=torch==2.14.1   # any torch >= 2.4 works; this one matches nvcc 13.0 here

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# (pip itself is left as it is: where pip is capped to a local torch, pip >= 26.2 would not apply
# the cap inside build environments.)
python -m pip install -q --upgrade setuptools wheel
if [ -n "${TORCH_SPEC:-}" ]; then
  python -m pip install -q "$TORCH_SPEC"   # asked for: into a new or an existing .venv
else
  python -c "import torch" 2>/dev/null || python -m pip install -q "$DEFAULT_TORCH"
fi
python -m pip install -q ninja numpy pytest hypothesis matplotlib tqdm scikit-learn

# nvcc outside PATH (e.g. /usr/local/cuda/bin) is found by setup.py; with no GPU present the
# CUDA kernel is compiled for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Editable, so that the compiled extension lands in rmsprop_fused/ here: a script run from the
# checkout's root imports this source tree, not a copy in site-packages, and must find it there.
python -m pip install -q --no-build-isolation -e .
# The report as a user's script run from the root sees the package; the setup fails if that is not
# the extension just built.
python -m rmsprop_fused
if [ "${RMSPROP_FUSED_BUILD_EXTENSION:-1}" != 0 ]; then
  python -c 'import sys, rmsprop_fused._extension as e; sys.exit(e.load_error)'
fi
