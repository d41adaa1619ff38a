#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU, its own Python with
# torch >= 2.4, and no network (issue #15):
#
#   bash scripts/gpu_check.sh DIR [--parts probe,build,...] [--budget SECONDS]
#
# Parts, in order, each time-boxed (`timeout`; GPU_CHECK_BOX_<PART>=seconds overrides a box) and
# all of them within the budget (default 470 s: at most 8 minutes on an H100 or H200):
#   probe        the GPU seen by torch (name, capability), torch >= 2.4; every later part needs it
#   build        pip install --no-build-isolation . against that torch (CUDA_HOME and
#                TORCH_CUDA_ARCH_LIST set to the visible GPU's architecture unless given; MAX_JOBS = cores)
#   tests        the whole test suite against the installed package, the CUDA build required; it fails
#                on any test skipped for a missing GPU, CUDA kernel or Triton (bench/gpu_check.py)
#   bench        bench/bench_step.py on the GPU: GPT-2 small, ResNet-50, many-small, one huge tensor;
#                fp32, bf16; plain, centered + momentum; fused-cuda, fused-triton, the roofline, torch
#                foreach and for-loop, torch.compile within a compile budget; step and kernel times
#   train        examples/train.py with AMP and a CUDA graph (cuda and triton backends), and --compare
#   sanitizer    bench/cuda_smoke.py under compute-sanitizer memcheck and racecheck, where it is present
#   bench-extra  GPT-2 fp32 with bf16 and 8-bit state, and clipping (issues #12, #13)
# (The order is the order of importance: when the budget runs out, the last parts are the ones skipped.)
#
# Writes into DIR: summary.txt (one tab-separated line per part, `part status seconds detail`,
# then `overall`; rewritten after every part, so it survives a failing or hanging part),
# summary.json, logs/<part>.log, the benchmark's JSON and PNG, tests.xml, and gpu_check.tar.gz
# holding all of it. Exit status 0 when every part that ran passed and the GPU was seen.
#
# GPU_CHECK_PYTHON (default: $PYTHON, else python3) is the interpreter; the tests run it too.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARTS_ALL=(probe build tests bench train sanitizer bench-extra)
declare -A BOX=([probe]=60 [build]=240 [sanitizer]=90 [tests]=180 [bench]=270 [train]=90 [bench-extra]=90)
# A part is not started with fewer seconds than this left: it could not finish.
MIN_SECONDS=${GPU_CHECK_MIN_SECONDS:-20}

usage() {
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# ------------------------------------------------------------------------------------ one part
# `gpu_check.sh --run-part PART DIR` runs one part's commands: the driver below calls it under
# `timeout`, so that a hang in any command of a part ends with the part.

part_probe() {
  "$PYTHON" "$ROOT/bench/gpu_check.py" probe | tee "$DIR/probe.env"
  local rc=${PIPESTATUS[0]}
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  return "$rc"
}

part_build() {
  cd "$ROOT" || return 1
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  # --no-index --no-deps: no network here, and torch is already installed (the one to build against).
  "$PYTHON" -m pip install --no-build-isolation --no-index --no-deps -v . || return 1
  # From another directory: a script in the checkout's root would import the source tree instead.
  cd "$DIR" && "$PYTHON" -c '
import sys, rmsprop_fused, rmsprop_fused._extension as e
print("installed at", rmsprop_fused.__file__, "build info", e.build_info)
sys.exit("the extension does not load: %s" % e.load_error if e.load_error else
         None if (e.build_info or {}).get("cuda") else "the extension has no CUDA kernel")'
}

part_sanitizer() {
  local tool rc=0
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    # No caching allocator: every tensor is its own allocation, so memcheck sees an access past
    # a tensor's end instead of landing in a neighbour inside torch's pool.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
      "$PYTHON" "$ROOT/bench/cuda_smoke.py" || rc=1
  done
  return "$rc"
}

part_tests() {
  local args=(-q -rs -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" --junitxml "$DIR/tests.xml")
  if "$PYTHON" -c "import xdist" 2>/dev/null; then
    args+=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
  fi
  mkdir -p "$DIR/tests-cwd"
  # From a directory of its own: the installed package is imported, not the checkout's sources.
  cd "$DIR/tests-cwd" && RMSPROP_FUSED_REQUIRE_EXTENSION=1 RMSPROP_FUSED_REQUIRE_CUDA_BUILD=1 \
    "$PYTHON" -m pytest "${args[@]}" "$ROOT/tests"
}

part_bench() {
  "$PYTHON" "$ROOT/bench/bench_step.py" --device cuda --out "$DIR" \
    --lists gpt2,resnet50,many-small,huge --dtypes fp32,bf16 --options plain,centered+momentum \
    --impls fused-cuda,fused-triton,roofline,torch-foreach,torch-forloop,torch-compile \
    --min-time 0.5 --compile-budget-s "${GPU_CHECK_COMPILE_BUDGET_S:-90}"
}

part_train() {
  cd "$ROOT/examples" || return 1
  "$PYTHON" train.py --device cuda --amp --cuda-graph --epochs 3 --backend cuda &&
    "$PYTHON" train.py --device cuda --amp --cuda-graph --epochs 3 --backend triton &&
    "$PYTHON" train.py --device cuda --amp --compare --epochs 2
}

part_bench_extra() {
  "$PYTHON" "$ROOT/bench/bench_step.py" --device cuda --out "$DIR" --tag state-clip \
    --lists gpt2 --dtypes fp32 --options plain,centered+momentum,plain+clip,centered+momentum+clip \
    --impls fused-cuda,fused-cuda:bf16,fused-cuda:8bit,roofline,roofline:bf16,roofline:8bit,clip+fused-cuda,torch-foreach,bnb,bnb:8bit \
    --min-time 0.5 --kernel-time-steps 2
}

if [ "${1:-}" = "--run-part" ]; then
  PART=$2 DIR=$3  # everything else comes from the driver's environment
  "part_${PART//-/_}"
  exit $?
fi

# ------------------------------------------------------------------------------------ driver

DIR="" PARTS="" BUDGET=${GPU_CHECK_BUDGET_S:-470}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --parts) PARTS=${2:-}; shift 2 || { echo "--parts needs a list" >&2; exit 2; } ;;
    --parts=*) PARTS=${1#--parts=}; shift ;;
    --budget) BUDGET=${2:-}; shift 2 || { echo "--budget needs seconds" >&2; exit 2; } ;;
    --budget=*) BUDGET=${1#--budget=}; shift ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -n "$DIR" ]; then echo "one DIR only, got $DIR and $1" >&2; exit 2; fi; DIR=$1; shift ;;
  esac
done
if [ -z "$DIR" ]; then
  echo "usage: bash scripts/gpu_check.sh DIR [--parts $(IFS=,; echo "${PARTS_ALL[*]}")] [--budget SECONDS]" >&2
  exit 2
fi
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "--budget must be whole seconds, got '$BUDGET'" >&2
  exit 2
fi
declare -A WANTED=()
if [ -z "$PARTS" ]; then
  for p in "${PARTS_ALL[@]}"; do WANTED[$p]=1; done
else
  IFS=, read -ra asked <<<"$PARTS"
  for p in "${asked[@]}"; do
    if [ -z "${BOX[$p]:-}" ]; then
      echo "unknown part '$p' (parts: $(IFS=,; echo "${PARTS_ALL[*]}"))" >&2
      exit 2
    fi
    WANTED[$p]=1
  done
  WANTED[probe]=1  # every part needs to know the GPU
fi
for p in "${PARTS_ALL[@]}"; do
  var="GPU_CHECK_BOX_${p//-/_}"; var=${var^^}
  if [ -n "${!var:-}" ]; then BOX[$p]=${!var}; fi
done

mkdir -p "$DIR/logs" || exit 2
DIR=$(cd "$DIR" && pwd)
export ROOT DIR
export PYTHON=${GPU_CHECK_PYTHON:-${PYTHON:-python3}}
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  fi
fi
export CUDA_HOME=${CUDA_HOME:-}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}")}
export SANITIZER

SUMMARY="$DIR/summary.txt"
LINES=()
write_summary() {  # the whole file each time, from LINES (and the overall line when given)
  {
    echo "# gpu_check $(date -Is) on ${HOSTNAME:-?}: part<TAB>status<TAB>seconds<TAB>detail"
    printf '%s\n' "${LINES[@]}"
    [ $# -gt 0 ] && echo "$1"
  } >"$SUMMARY.partial" && mv "$SUMMARY.partial" "$SUMMARY"
}
record() {  # part status seconds detail
  LINES+=("$(printf '%s\t%s\t%s\t%s' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-600)")")
  write_summary
  printf '%-12s %-8s %4s s  %s\n' "$1" "$2" "$3" "$4"
}

SECONDS=0
FAILED=() BLOCKED=""
run_part() {  # part: time-boxed, logged, recorded; returns 0 when it passed
  local part=$1 left box rc began
  if [ -z "${WANTED[$part]:-}" ]; then record "$part" SKIP 0 "not asked for (--parts)"; return 2; fi
  if [ -n "$BLOCKED" ]; then record "$part" SKIP 0 "$BLOCKED"; return 2; fi
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt "$MIN_SECONDS" ] || [ "$left" -lt 1 ]; then
    record "$part" SKIP 0 "no time left (${left} s of the ${BUDGET} s budget)"; FAILED+=("$part"); return 2
  fi
  box=${BOX[$part]}
  if [ "$left" -lt "$box" ]; then box=$left; fi
  began=$SECONDS
  # SIGINT first (pytest and Python then write what they have), KILL 15 s later.
  timeout -s INT -k 15 "$box" bash "${BASH_SOURCE[0]}" --run-part "$part" "$DIR" >"$DIR/logs/$part.log" 2>&1
  rc=$?
  ELAPSED=$((SECONDS - began))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || { [ "$rc" -eq 130 ] && [ "$ELAPSED" -ge "$box" ]; }; then
    STATUS=TIMEOUT DETAIL="stopped after the part's ${box} s box"
  elif [ "$rc" -eq 0 ]; then
    STATUS=PASS DETAIL=""
  else
    STATUS=FAIL DETAIL="exit status $rc; last line: $(grep -v '^\s*$' "$DIR/logs/$part.log" | tail -n 1 | cut -c1-200)"
  fi
  return 0
}
finish_part() {  # part detail: records the outcome of the last run_part
  [ "$STATUS" = PASS ] || FAILED+=("$1")
  record "$1" "$STATUS" "$ELAPSED" "$2"
}
tarball() {  # written outside DIR, then moved in: tar never reads the archive it is writing
  local tmp rc
  tmp=$(mktemp "${TMPDIR:-/tmp}/gpu_check.tar.gz.XXXXXX") || return 1
  tar czf "$tmp" -C "$DIR" --warning=no-file-changed --exclude ./gpu_check.tar.gz --exclude ./tests-cwd . 2>/dev/null
  rc=$?
  # GNU tar's status 1: a file changed while it was read (a log still being flushed); the archive is whole.
  if [ "$rc" -le 1 ]; then mv -f "$tmp" "$DIR/gpu_check.tar.gz"; else rm -f "$tmp"; fi
}
trap 'write_summary "$(printf "overall\tFAIL\t%s\tinterrupted" "$SECONDS")"; tarball; exit 130' INT TERM

echo "gpu_check into $DIR, budget ${BUDGET} s, python $PYTHON"
rm -f "$DIR/probe.env" "$DIR/tests.xml"
write_summary

# probe: without a GPU every other part is skipped and the check fails.
if run_part probe; then
  gpu=$(sed -n 's/^gpu=//p' "$DIR/probe.env" 2>/dev/null)
  arch=$(sed -n 's/^capability=//p' "$DIR/probe.env" 2>/dev/null)
  if [ "$STATUS" = PASS ]; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}  # build for the visible GPU alone
    DETAIL="$gpu (sm ${arch}), $(sed -n 's/^torch=/torch /p; s/^triton=/triton /p; s/^python=/python /p' "$DIR/probe.env" | paste -sd, - | sed 's/,/, /g')"
  else
    problem=$(sed -n 's/^problem=//p' "$DIR/probe.env" 2>/dev/null)
    DETAIL="no usable GPU: ${problem:-see logs/probe.log}"
    BLOCKED="the probe saw no usable GPU"
  fi
  finish_part probe "$DETAIL"
fi

if run_part build; then
  [ "$STATUS" = PASS ] && DETAIL="TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-none}; the extension loads with its CUDA kernel"
  finish_part build "$DETAIL"
  [ "$STATUS" = PASS ] || BLOCKED="the build failed"
fi

if run_part tests; then
  tests_line=$("$PYTHON" "$ROOT/bench/gpu_check.py" tests-detail "$DIR/tests.xml" 2>&1)
  tests_ok=$?
  if [ "$STATUS" = PASS ] && [ "$tests_ok" -ne 0 ]; then STATUS=FAIL; fi
  finish_part tests "${DETAIL:+$DETAIL; }$tests_line"
fi

bench_json() {  # main|extra: the newest JSON that part of the benchmark wrote
  if [ "$1" = main ]; then ls -t "$DIR"/cuda-*.json 2>/dev/null | grep -v -- "-state-clip" | head -n 1
  else ls -t "$DIR"/cuda-*-state-clip.json 2>/dev/null | head -n 1; fi
}

if run_part bench; then
  bench_line=$("$PYTHON" "$ROOT/bench/gpu_check.py" bench-detail "$(bench_json main)" 2>&1)
  bench_ok=$?
  if [ "$STATUS" = PASS ] && [ "$bench_ok" -ne 0 ]; then STATUS=FAIL; fi
  finish_part bench "${DETAIL:+$DETAIL; }$bench_line"
fi

if run_part train; then
  [ "$STATUS" = PASS ] && DETAIL="AMP + CUDA graph, cuda and triton: $(grep -h 'final training loss' "$DIR/logs/train.log" | paste -sd';' -)"
  finish_part train "$DETAIL"
fi

if [ -n "${WANTED[sanitizer]:-}" ] && [ -z "$BLOCKED" ] && ! [ -x "$SANITIZER" ]; then
  record sanitizer SKIP 0 "compute-sanitizer not found (COMPUTE_SANITIZER, PATH, \$CUDA_HOME/bin)"
elif run_part sanitizer; then
  [ "$STATUS" = PASS ] && DETAIL="memcheck and racecheck clean: $(grep -c '^ok' "$DIR/logs/sanitizer.log") cases ok"
  [ "$STATUS" = FAIL ] && DETAIL="$DETAIL; $(grep -E -m 3 '^(FAIL|=+ ERROR|=+ [A-Z][a-z]+ .* of size)' "$DIR/logs/sanitizer.log" | paste -sd';' -)"
  finish_part sanitizer "$DETAIL"
fi

if run_part bench-extra; then
  extra_line=$("$PYTHON" "$ROOT/bench/gpu_check.py" bench-detail "$(bench_json extra)" 2>&1)
  extra_ok=$?
  if [ "$STATUS" = PASS ] && [ "$extra_ok" -ne 0 ]; then STATUS=FAIL; fi
  finish_part bench-extra "${DETAIL:+$DETAIL; }$extra_line"
fi

if [ ${#FAILED[@]} -eq 0 ] && [ -z "$BLOCKED" ]; then
  OVERALL="$(printf 'overall\tPASS\t%s\tevery part that ran passed' "$SECONDS")"
else
  OVERALL="$(printf 'overall\tFAIL\t%s\t%s' "$SECONDS" "${BLOCKED:-failed: ${FAILED[*]}}")"
fi
write_summary "$OVERALL"
"$PYTHON" "$ROOT/bench/gpu_check.py" finish "$DIR" >/dev/null 2>&1 || true
tarball
echo "$OVERALL" | tr '\t' ' '
echo "summary: $SUMMARY"
[[ "$OVERALL" == overall$'\t'PASS* ]]
