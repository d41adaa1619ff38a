#!/usr/bin/env bash
# Fresh clone -> the main job: set up and build (scripts/setup.sh, which also prints which
# backends run here), then the kernel microbenchmark in quick mode, the d2l RMSProp chapter's
# experiments and a training run with torch.optim.RMSprop and FusedRMSprop side by side.
# Outputs: bench/out/<device>.{json,png}, examples/out/*.png. A GPU is used when one is visible.
# Extra arguments go to the benchmark (e.g. drop --quick by passing --full).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate

bench_args=(--quick)
if [ "${1:-}" = "--full" ]; then bench_args=(); shift; fi
python bench/bench_step.py "${bench_args[@]}" --out bench/out "$@"
python examples/d2l_rmsprop.py --out examples/out
python examples/train.py --compare --epochs 2
