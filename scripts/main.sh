#!/usr/bin/env bash
# Fresh clone -> the main job: set up and build (scripts/setup.sh, which also prints which
# backends run here), then the kernel microbenchmark in quick mode, the d2l RMSProp chapter's
# experiments and exercises, and a training run with torch.optim.RMSprop and FusedRMSprop side by
# side. Outputs: bench/out/<device>-quick.{json,png}, examples/out/*.png. A GPU is used when one is
# visible. Extra arguments go to the benchmark (--full first: every case instead of --quick).
# FASHION_MNIST=DIR runs the chapter's exercise 3 on a local Fashion-MNIST instead of the digits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
SECONDS=0

bench_args=(--quick)
if [ "${1:-}" = "--full" ]; then bench_args=(); shift; fi
python bench/bench_step.py "${bench_args[@]}" "$@"
python examples/d2l_rmsprop.py ${FASHION_MNIST:+--fashion-mnist "$FASHION_MNIST"}
python examples/train.py --compare --epochs 2
echo "main job: ${SECONDS} s after the setup"
