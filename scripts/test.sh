#!/usr/bin/env bash
# Fresh clone -> the whole test suite: set up (scripts/setup.sh), then pytest on the package built
# into the checkout. Extra arguments go to pytest (e.g. --runslow, -k triton).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate

# Fail, rather than skip, when the extension this machine can build is missing.
export RMSPROP_FUSED_REQUIRE_EXTENSION=1
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ]; then
  export RMSPROP_FUSED_REQUIRE_CUDA_BUILD=1
fi
pytest tests -q "$@"
