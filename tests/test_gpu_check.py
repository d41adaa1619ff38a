"""scripts/gpu_check.sh without a GPU: its argument handling, and the summary it writes from fake
runs, where a stand-in interpreter plays the GPU machine's Python (the probe, pip, pytest, the
benchmark, the examples) and stand-ins play nvidia-smi and compute-sanitizer; and the Python side
(bench/gpu_check.py) on reports written here, the benchmark's own JSON among them."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

PARTS = ["probe", "build", "tests", "bench", "train", "sanitizer", "bench-extra"]

# The GPU machine's Python, faked: FAKE_SCENARIO (comma-separated) picks what goes wrong. What it
# does not fake (bench/gpu_check.py's details and summary) it hands to the real interpreter.
FAKE_PYTHON = textwrap.dedent('''\
    #!{python}
    import json, os, signal, sys, time
    argv = sys.argv[1:]
    scenario = os.environ.get("FAKE_SCENARIO", "").split(",")
    with open(os.path.join(os.environ["FAKE_LOG_DIR"], "calls.jsonl"), "a") as log:
        log.write(json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in (
            "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME", "RMSPROP_FUSED_REQUIRE_EXTENSION",
            "RMSPROP_FUSED_REQUIRE_CUDA_BUILD", "PYTORCH_NO_CUDA_MEMORY_CACHING", "FAKE_UNDER_SANITIZER")}}}}) + "\\n")

    def option(name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default

    script = os.path.basename(argv[0]) if argv else ""
    if script == "gpu_check.py" and argv[1] == "probe":
        if "no-gpu" in scenario:
            print("python=3.12.3\\ntorch=2.11.0+cu130\\nproblem=torch sees no CUDA GPU (torch.cuda.is_available() is False)")
            sys.exit(1)
        print("python=3.12.3\\ntorch=2.11.0+cu130\\ntorch_cuda=13.0\\ntriton=3.6.0\\ngpu=Fake GPU 9000\\ncapability=9.0")
    elif argv[:2] == ["-m", "pip"]:
        print("Successfully installed rmsprop-fused-0.1.0")
        sys.exit(1 if "build-fail" in scenario else 0)
    elif argv[:1] == ["-c"] and "import xdist" in argv[1]:
        sys.exit(1)  # no pytest-xdist here
    elif argv[:1] == ["-c"] and "rmsprop_fused._extension" in argv[1]:
        print("installed at /site-packages/rmsprop_fused/__init__.py")
    elif argv[:2] == ["-m", "pytest"]:
        skip = "no CUDA GPU is visible" if "tests-gpu-skip" in scenario else "slow: run with --runslow"
        failure = '<testcase classname="tests.test_cuda" name="test_step"><failure message="boom"/></testcase>' if "tests-fail" in scenario else ""
        with open(option("--junitxml"), "w") as f:
            f.write('<testsuites><testsuite name="pytest">'
                    + "".join(f'<testcase classname="tests.test_cuda" name="test_{{i}}"/>' for i in range(3))
                    + f'<testcase classname="tests.test_cuda" name="test_big"><skipped message="{{skip}}"/></testcase>'
                    + failure + "</testsuite></testsuites>")
        print("3 passed" + (", 1 failed" if failure else ""))
        sys.exit(1 if failure else 0)
    elif script == "cuda_smoke.py":
        print("ok   cuda fp32 plain state none\\nok   triton fp32 plain state none\\n0 case(s) failed")
    elif script == "bench_step.py":
        tag = option("--tag")
        if "bench-hang" in scenario and tag is None:
            time.sleep(600)
        rows = [{{"list_name": "gpt2", "dtype": "fp32", "options": "plain", "impl": "fused-cuda", "gbps": 4000.0,
                  "fraction_of_copy": 0.93, "fraction_of_roofline": 0.97, "kernel_s": 6e-4, "kernel_fraction_of_copy": 0.95,
                  "speedup_vs_foreach": 3.1}},
                {{"list_name": "gpt2", "dtype": "fp32", "options": "plain", "impl": "torch-compile", "skipped": "budget"}}]
        goals = [{{"goal": "fused-cuda >= 90% of the copy bandwidth", "case": "gpt2 fp32 plain", "met": True}},
                 {{"goal": "fused-cuda >= 1.0x the torch.compile'd step", "case": "gpt2 fp32 plain", "met": False}}]
        report = {{"environment": {{"device_name": "Fake GPU 9000"}}, "finished": True, "results": rows, "goals": goals,
                  "bandwidth": {{"gpt2": {{"copy_gbps": 4300.0, "rated_gbps": 4800.0}}}}}}
        out = option("--out")
        with open(os.path.join(out, "cuda-fake-gpu-9000" + (f"-{{tag}}" if tag else "") + ".json"), "w") as f:
            json.dump(report, f)
    elif script == "train.py":
        print("final training loss 0.123456")
    else:
        os.execv({python!r}, [{python!r}] + argv)
''')

FAKE_SANITIZER = textwrap.dedent('''\
    #!/usr/bin/env bash
    # compute-sanitizer --tool T --error-exitcode N command...: records the tool, runs the command
    echo "$2" >> "$FAKE_LOG_DIR/sanitizer_tools"
    shift 4
    FAKE_UNDER_SANITIZER=1 exec "$@"
''')

FAKE_NVIDIA_SMI = "#!/usr/bin/env bash\necho 'name, driver_version'\necho 'Fake GPU 9000, 999.1'\n"


@pytest.fixture
def fake_machine(tmp_path):
    """(environment for the script, directory of the fakes' call logs)."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log_dir.mkdir()
    fakes = {"python": FAKE_PYTHON.format(python=sys.executable), "compute-sanitizer": FAKE_SANITIZER,
             "nvidia-smi": FAKE_NVIDIA_SMI}
    for name, text in fakes.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "TORCH_CUDA_ARCH_LIST", "COMPUTE_SANITIZER"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", GPU_CHECK_PYTHON=str(bin_dir / "python"), FAKE_LOG_DIR=str(log_dir),
               CUDA_HOME="/opt/fake-cuda", MAX_JOBS="3")
    return env, log_dir


def run_check(env, out_dir, *args, scenario="", timeout=120, **extra_env):
    began = time.monotonic()
    result = subprocess.run(["bash", SCRIPT, str(out_dir), *args], env=dict(env, FAKE_SCENARIO=scenario, **extra_env),
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - began


def calls(log_dir):
    return [json.loads(line) for line in (log_dir / "calls.jsonl").read_text().splitlines()]


def by_part(summary_dir):
    entries = gpu_check.read_summary(str(summary_dir / "summary.txt"))
    return {e["part"]: e for e in entries}, [e["part"] for e in entries]


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("args, message", [
    ([], "usage: bash scripts/gpu_check.sh DIR"),
    (["out", "--parts", "probe,nonsense"], "unknown part 'nonsense'"),
    (["out", "--budget", "ten"], "--budget must be whole seconds"),
    (["out", "other"], "one DIR only"),
    (["out", "--frobnicate"], "unknown option --frobnicate"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, message):
    result = subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()


def test_help_names_every_part():
    result = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for part in PARTS:
        assert f"\n  {part} " in result.stdout
    assert "summary.txt" in result.stdout and "#!" not in result.stdout


# ----------------------------------------------------------------------------- fake runs


def test_a_passing_fake_run_writes_every_part_in_order(fake_machine, tmp_path):
    env, log_dir = fake_machine
    out = tmp_path / "out"
    result, _ = run_check(env, out)
    assert result.returncode == 0, result.stdout + result.stderr
    parts, order = by_part(out)
    assert order == PARTS + ["overall"]
    assert all(parts[p]["status"] == "PASS" for p in order), parts
    assert "Fake GPU 9000 (sm 9.0)" in parts["probe"]["detail"] and "torch 2.11.0+cu130" in parts["probe"]["detail"]
    assert "TORCH_CUDA_ARCH_LIST=9.0" in parts["build"]["detail"] and "MAX_JOBS=3" in parts["build"]["detail"]
    assert parts["tests"]["detail"] == "3 passed, 0 failed, 1 skipped (0 for a missing GPU)"
    assert "2 of 2 timings" not in parts["bench"]["detail"]  # a skipped row is no timing
    assert "1 of 2 timings" in parts["bench"]["detail"] and "copy 4300 GB/s of 4800 rated" in parts["bench"]["detail"]
    assert "fused-cuda gpt2 fp32 plain 4000 GB/s = 93% of copy, 97% of roofline, kernels 95% of copy, 3.10x foreach" in parts["bench"]["detail"]
    assert "goals met 1/2 (missed: fused-cuda >= 1.0x the torch.compile'd step on gpt2 fp32 plain)" in parts["bench"]["detail"]
    assert "final training loss 0.123456" in parts["train"]["detail"]
    assert "memcheck and racecheck clean: 4 cases ok" == parts["sanitizer"]["detail"]
    assert json.loads((out / "summary.json").read_text()) == gpu_check.read_summary(str(out / "summary.txt"))
    for part in PARTS:
        assert (out / "logs" / f"{part}.log").exists()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "./summary.txt" in names and "./logs/tests.log" in names and "./tests.xml" in names

    seen = calls(log_dir)
    pip = next(c for c in seen if c["argv"][:2] == ["-m", "pip"])
    assert "--no-build-isolation" in pip["argv"] and pip["argv"][-1] == "."
    assert pip["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0" and pip["env"]["CUDA_HOME"] == "/opt/fake-cuda"
    pytest_call = next(c for c in seen if c["argv"][:2] == ["-m", "pytest"])
    assert pytest_call["argv"][-1] == os.path.join(ROOT, "tests") and pytest_call["cwd"] != ROOT  # the installed package
    assert pytest_call["env"]["RMSPROP_FUSED_REQUIRE_EXTENSION"] == "1" and pytest_call["env"]["RMSPROP_FUSED_REQUIRE_CUDA_BUILD"] == "1"
    smoke = [c for c in seen if c["argv"] and c["argv"][0].endswith("cuda_smoke.py")]
    assert len(smoke) == 2 and all(c["env"]["FAKE_UNDER_SANITIZER"] == "1" and c["env"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" for c in smoke)
    assert (log_dir / "sanitizer_tools").read_text().split() == ["memcheck", "racecheck"]
    benches = [c["argv"] for c in seen if c["argv"] and c["argv"][0].endswith("bench_step.py")]
    assert len(benches) == 2 and all("--device" in b and b[b.index("--device") + 1] == "cuda" for b in benches)
    main_bench = benches[0]
    assert main_bench[main_bench.index("--lists") + 1] == "gpt2,resnet50,many-small,huge"
    assert set(main_bench[main_bench.index("--impls") + 1].split(",")) == {
        "fused-cuda", "fused-triton", "roofline", "torch-foreach", "torch-forloop", "torch-compile"}
    trains = [c["argv"] for c in seen if c["argv"] and c["argv"][0] == "train.py"]
    assert sum("--cuda-graph" in t and "--amp" in t for t in trains) == 2


def test_failing_and_hanging_parts_are_recorded_and_the_rest_still_runs(fake_machine, tmp_path):
    env, _ = fake_machine
    out = tmp_path / "out"
    result, seconds = run_check(env, out, scenario="tests-fail,bench-hang", GPU_CHECK_BOX_BENCH="3")
    assert result.returncode == 1
    parts, order = by_part(out)
    assert order == PARTS + ["overall"]
    assert parts["tests"]["status"] == "FAIL" and "1 failed" in parts["tests"]["detail"]
    assert "test_cuda::test_step" in parts["tests"]["detail"]
    assert parts["bench"]["status"] == "TIMEOUT" and "3 s box" in parts["bench"]["detail"]
    assert 3 <= parts["bench"]["seconds"] < 30 and seconds < 100  # the hang ended with its box
    assert parts["train"]["status"] == parts["bench-extra"]["status"] == "PASS"
    assert parts["overall"]["status"] == "FAIL" and parts["overall"]["detail"] == "failed: tests bench"


def test_tests_skipped_for_a_missing_gpu_fail_the_check(fake_machine, tmp_path):
    env, _ = fake_machine
    result, _ = run_check(env, tmp_path / "out", "--parts", "tests", scenario="tests-gpu-skip")
    parts, _ = by_part(tmp_path / "out")
    assert result.returncode == 1
    assert parts["tests"]["status"] == "FAIL" and "(1 for a missing GPU)" in parts["tests"]["detail"]
    assert parts["build"]["status"] == "SKIP" and parts["build"]["detail"] == "not asked for (--parts)"


def test_no_gpu_fails_the_check_and_skips_everything_else(fake_machine, tmp_path):
    env, log_dir = fake_machine
    result, _ = run_check(env, tmp_path / "out", scenario="no-gpu")
    assert result.returncode == 1
    parts, order = by_part(tmp_path / "out")
    assert parts["probe"]["status"] == "FAIL" and "torch sees no CUDA GPU" in parts["probe"]["detail"]
    assert all(parts[p]["status"] == "SKIP" and parts[p]["detail"] == "the probe saw no usable GPU" for p in PARTS[1:])
    assert parts["overall"]["status"] == "FAIL"
    assert not any(c["argv"][:2] == ["-m", "pip"] for c in calls(log_dir))


def test_a_failed_build_skips_the_parts_that_need_it(fake_machine, tmp_path):
    env, _ = fake_machine
    result, _ = run_check(env, tmp_path / "out", scenario="build-fail")
    parts, _ = by_part(tmp_path / "out")
    assert result.returncode == 1 and parts["build"]["status"] == "FAIL" and "exit status 1" in parts["build"]["detail"]
    assert all(parts[p]["status"] == "SKIP" and parts[p]["detail"] == "the build failed" for p in PARTS[2:])


def test_the_budget_bounds_the_whole_check(fake_machine, tmp_path):
    """A hanging part gets at most what is left of the budget; the parts after it, which would have
    too little left, are skipped and fail the check."""
    env, _ = fake_machine
    result, seconds = run_check(env, tmp_path / "out", "--parts", "bench,train", "--budget", "6", scenario="bench-hang",
                                GPU_CHECK_MIN_SECONDS="3")
    parts, _ = by_part(tmp_path / "out")
    assert result.returncode == 1 and seconds < 60
    assert parts["bench"]["status"] == "TIMEOUT" and parts["bench"]["seconds"] <= 8
    assert parts["train"]["status"] == "SKIP" and "no time left" in parts["train"]["detail"]
    assert "train" in parts["overall"]["detail"]


def test_a_missing_sanitizer_is_skipped_not_failed(fake_machine, tmp_path):
    env, _ = fake_machine
    result, _ = run_check(env, tmp_path / "out", "--parts", "sanitizer", COMPUTE_SANITIZER="/nonexistent/compute-sanitizer")
    parts, _ = by_part(tmp_path / "out")
    assert result.returncode == 0
    assert parts["sanitizer"]["status"] == "SKIP" and "compute-sanitizer not found" in parts["sanitizer"]["detail"]


# ----------------------------------------------------------------------------- the Python side


def write_junit(path, cases):
    body = "".join(f'<testcase classname="tests.{c}" name="{n}">{inner}</testcase>' for c, n, inner in cases)
    path.write_text(f"<testsuites><testsuite>{body}</testsuite></testsuites>")


@pytest.mark.parametrize("reason, missing", [
    ("no CUDA GPU is visible", True),
    ("needs a CUDA GPU", True),
    ("the extension was built without the CUDA kernel (nvcc was not found)", True),
    ("the CUDA kernel was built for '8.0' but this GPU is sm_90: rebuild", True),
    ("slow: run with --runslow", False),
    ("needs 16 GiB of GPU memory", False),
    ("a GPU is visible here: the cuda backend is available", False),
])
def test_tests_detail_tells_skips_for_a_missing_gpu_from_the_others(tmp_path, reason, missing):
    junit = tmp_path / "t.xml"
    write_junit(junit, [("test_cuda", "test_a", ""), ("test_cuda", "test_b", f'<skipped message="{reason}"/>')])
    line, ok = gpu_check.tests_detail(str(junit))
    assert ok is not missing
    assert line.startswith(f"1 passed, 0 failed, 1 skipped ({int(missing)} for a missing GPU)")


def test_tests_detail_fails_on_failures_errors_and_an_empty_or_missing_report(tmp_path):
    junit = tmp_path / "t.xml"
    write_junit(junit, [("test_x", "test_a", '<failure message="no"/>'), ("test_x", "test_b", '<error message="no"/>')])
    line, ok = gpu_check.tests_detail(str(junit))
    assert not ok and line.startswith("0 passed, 2 failed") and "test_x::test_a" in line
    write_junit(junit, [])
    assert gpu_check.tests_detail(str(junit))[1] is False
    line, ok = gpu_check.tests_detail(str(tmp_path / "missing.xml"))
    assert not ok and line.startswith("no JUnit report")


def test_bench_detail_reads_the_benchmarks_own_json(tmp_path, monkeypatch):
    """The detail line from a JSON the benchmark itself wrote (a tiny CPU run)."""
    import bench_step as bench
    import param_lists

    tiny = param_lists.ParamList("gpt2", "a stand-in for GPT-2's name", ((3, 5), (17,)))
    monkeypatch.setitem(bench.LISTS, "gpt2", lambda: tiny)
    assert bench.main(["--device", "cpu", "--out", str(tmp_path), "--lists", "gpt2", "--options", "plain", "--dtypes", "fp32",
                       "--impls", "fused-cpu,torch-forloop", "--repeats", "2", "--min-time", "0",
                       "--bandwidth-log2-numel", "14"]) == 0
    line, ok = gpu_check.bench_detail(str(tmp_path / (bench.device_stem(torch.device("cpu")) + ".json")))
    assert ok and line.startswith("2 of 2 timings, ") and "fused-cpu gpt2 fp32 plain" in line and "of copy" in line, line
    line, ok = gpu_check.bench_detail(str(tmp_path / "none.json"))
    assert not ok and line.startswith("no benchmark JSON")


def test_read_summary_refuses_an_unknown_status(tmp_path):
    path = tmp_path / "summary.txt"
    path.write_text("# comment\nbuild\tPASS\t12\tfine\n\ntests\tMAYBE\t3\t?\n")
    with pytest.raises(ValueError, match="MAYBE"):
        gpu_check.read_summary(str(path))
    path.write_text("build\tPASS\t12\tfine\twith a tab\n")
    assert gpu_check.read_summary(str(path)) == [{"part": "build", "status": "PASS", "seconds": 12, "detail": "fine\twith a tab"}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here: the probe passes")
def test_probe_fails_without_a_gpu_and_says_why(capsys):
    assert gpu_check.main(["probe"]) == 1
    out = capsys.readouterr().out
    assert f"torch={torch.__version__}" in out and "problem=" in out
