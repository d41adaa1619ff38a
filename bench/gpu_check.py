"""The Python side of scripts/gpu_check.sh: the GPU probe, and the one-line details of its parts
read from what they wrote (the test suite's JUnit XML, the benchmark's JSON), and the summary.

    python bench/gpu_check.py probe                  # key=value lines; exit 1 without a usable GPU
    python bench/gpu_check.py tests-detail tests.xml # exit 1 on failures, or on skips for a missing GPU
    python bench/gpu_check.py bench-detail run.json  # exit 1 when the run measured nothing
    python bench/gpu_check.py finish DIR             # summary.txt -> summary.json, and the summary printed

The summary (DIR/summary.txt) is written by the shell script itself, one tab-separated line per
part, `part<TAB>status<TAB>seconds<TAB>detail`, with `#` comment lines, so that it stays writable
whatever fails; read_summary parses it. Only the standard library is used here, except by `probe`
(torch), so that the details and the summary work when torch does not.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional, Sequence, Tuple

STATUSES = ("PASS", "FAIL", "TIMEOUT", "SKIP")
MIN_TORCH = (2, 4)

# Skip reasons that mean the GPU, the CUDA build or Triton was not there: on a GPU check they are
# failures (the point of the run is that nothing GPU-related is skipped).
MISSING_GPU_PATTERNS = (
    r"no CUDA GPU", r"needs a CUDA GPU", r"needs a GPU", r"a second device type", r"CUDA is not available",
    r"built without the CUDA kernel", r"CUDA kernel was not built", r"extension is not built",
    r"has no kernel for cuda", r"CUDA kernel was built for", r"Triton is not importable", r"Triton is not installed",
)


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])


def probe() -> Tuple[Dict[str, str], Optional[str]]:
    """(facts about the GPU and the software, why the GPU check cannot run or None)."""
    facts: Dict[str, str] = {"python": sys.version.split()[0]}
    try:
        import torch
    except Exception as e:
        return facts, f"torch is not importable: {type(e).__name__}: {e}"
    facts["torch"] = torch.__version__
    facts["torch_cuda"] = str(torch.version.cuda)
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception as e:
        facts["triton"] = f"none ({type(e).__name__})"
    if _version_tuple(torch.__version__) < MIN_TORCH:
        return facts, f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}"
    if torch.version.cuda is None:
        return facts, f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return facts, "torch sees no CUDA GPU (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability(0)
    facts["gpu"] = torch.cuda.get_device_name(0)
    facts["gpus"] = str(torch.cuda.device_count())
    facts["capability"] = f"{major}.{minor}"
    facts["memory_gib"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
    return facts, None


def _skip_message(case: ElementTree.Element) -> Optional[str]:
    skipped = case.find("skipped")
    if skipped is None:
        return None
    return (skipped.get("message") or "") + " " + (skipped.text or "")


def tests_detail(junit_path: str) -> Tuple[str, bool]:
    """(one line about a pytest run from its JUnit XML, whether it passed: no failures or errors,
    and no test skipped for a missing GPU, CUDA build or Triton)."""
    try:
        root = ElementTree.parse(junit_path).getroot()
    except (OSError, ElementTree.ParseError) as e:
        return f"no JUnit report ({type(e).__name__}: {e})", False
    cases = list(root.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skips = [(c, _skip_message(c)) for c in cases if c.find("skipped") is not None]
    missing_gpu = [(c, m) for c, m in skips if any(re.search(p, m or "", re.IGNORECASE) for p in MISSING_GPU_PATTERNS)]
    passed = len(cases) - len(failed) - len(skips)
    line = f"{passed} passed, {len(failed)} failed, {len(skips)} skipped ({len(missing_gpu)} for a missing GPU)"
    if failed:
        line += "; first failures: " + ", ".join(_case_name(c) for c in failed[:3])
    if missing_gpu:
        line += "; skipped for a missing GPU: " + ", ".join(_case_name(c) for c, _ in missing_gpu[:3])
    return line, not failed and not missing_gpu and bool(cases)


def _case_name(case: ElementTree.Element) -> str:
    return f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name', '')}"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.0%}"


def bench_detail(json_path: str) -> Tuple[str, bool]:
    """(one line about a benchmark run from its JSON: cases measured, the GPT-2 fp32 plain figures
    of the fused CUDA step, the goals met; whether it measured anything)."""
    try:
        with open(json_path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        return f"no benchmark JSON ({type(e).__name__}: {e})", False
    rows = report.get("results", [])
    timed = [r for r in rows if r.get("gbps") is not None]
    parts = [f"{len(timed)} of {len(rows)} timings" + ("" if report.get("finished") else " (unfinished)")]
    env = report.get("environment", {})
    if env.get("device_name"):
        parts.append(env["device_name"])
    bandwidth = next(iter(report.get("bandwidth", {}).values()), None)
    if bandwidth:
        parts.append(f"copy {bandwidth['copy_gbps']:.0f} GB/s" + (f" of {bandwidth['rated_gbps']:.0f} rated" if bandwidth.get("rated_gbps") else ""))
    for impl in ("fused-cuda", "fused-triton", "fused-cpu"):
        r = next((r for r in timed if r["impl"] == impl and r["list_name"] == "gpt2" and r["dtype"] == "fp32"
                  and r["options"] == "plain"), None)
        if r is not None:
            kernel = f", kernels {_percent(r.get('kernel_fraction_of_copy'))} of copy" if r.get("kernel_s") else ""
            foreach = f", {r['speedup_vs_foreach']:.2f}x foreach" if r.get("speedup_vs_foreach") else ""
            parts.append(f"{impl} gpt2 fp32 plain {r['gbps']:.0f} GB/s = {_percent(r.get('fraction_of_copy'))} of copy, "
                         f"{_percent(r.get('fraction_of_roofline'))} of roofline{kernel}{foreach}")
    found = report.get("goals", [])
    if found:
        missed = [g for g in found if not g["met"]]
        parts.append(f"goals met {len(found) - len(missed)}/{len(found)}"
                     + (" (missed: " + "; ".join(f"{g['goal']} on {g['case']}" for g in missed[:3]) + ")" if missed else ""))
    return ", ".join(parts), bool(timed)


def read_summary(path: str) -> List[Dict[str, object]]:
    """The summary's part lines as dicts: part, status, seconds (int), detail."""
    entries = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            part, status, seconds, detail = (line.split("\t", 3) + ["", "", ""])[:4]
            if status not in STATUSES:
                raise ValueError(f"{path}: {part!r} has status {status!r}, not one of {', '.join(STATUSES)}")
            entries.append({"part": part, "status": status, "seconds": int(seconds), "detail": detail})
    return entries


def finish(directory: str) -> int:
    """Writes summary.json beside summary.txt and prints the summary; exit status 0 when the
    overall line passed."""
    entries = read_summary(os.path.join(directory, "summary.txt"))
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(entries, f, indent=1)
    for e in entries:
        print(f"{e['part']:<12}{e['status']:<9}{e['seconds']:>5} s  {e['detail']}")
    overall = next((e for e in entries if e["part"] == "overall"), None)
    return 0 if overall is not None and overall["status"] == "PASS" else 1


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], list(argv[1:])
    if command == "probe":
        facts, problem = probe()
        for key, value in facts.items():
            print(f"{key}={value}")
        if problem:
            print(f"problem={problem}")
            return 1
        return 0
    if command in ("tests-detail", "bench-detail") and len(args) == 1:
        line, ok = (tests_detail if command == "tests-detail" else bench_detail)(args[0])
        print(line)
        return 0 if ok else 1
    if command == "finish" and len(args) == 1:
        return finish(args[0])
    print(f"unknown command or arguments: {' '.join(argv)}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
