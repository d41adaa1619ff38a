"""The benchmark's arithmetic (byte model, GB/s, statistics), its parameter lists, and a smoke run
of its case runner and command line on tiny tensors. Nothing here asserts on a timing."""

import json
import math
import os
import sys

import pytest
import torch

from common import available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_step as bench  # noqa: E402
import param_lists  # noqa: E402

TINY = param_lists.ParamList("tiny", "three small tensors", ((3, 5), (17,), (2, 2, 3)))
QUICK_PLAN = bench.TimingPlan(warmup=1, repeats=2, min_time=0.0, max_repeats=2)


# ----------------------------------------------------------------------------- byte model


@pytest.mark.parametrize(
    "centered, momentum, grad_scale, expected",
    [
        (False, 0.0, False, 20),  # read p, g, v; write p, v
        (False, 0.9, False, 28),  # + momentum_buffer read and written
        (True, 0.9, False, 36),   # + grad_avg read and written
        (True, 0.0, False, 28),
        (False, 0.0, True, 24),   # + the unscaled grad written back
        (True, 0.9, True, 40),
    ],
)
def test_min_bytes_per_fp32_element_is_the_design_table(centered, momentum, grad_scale, expected):
    assert bench.min_bytes_per_element(torch.float32, centered, momentum, grad_scale) == expected


def test_min_bytes_scale_with_the_element_size():
    for dtype, size in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float64, 8)):
        assert bench.min_bytes_per_element(dtype, True, 0.9) == 9 * size
        assert bench.min_bytes_per_element(dtype, False, 0.0) == 5 * size


def test_effective_gbps_is_bytes_over_seconds_in_decimal_gigabytes():
    assert bench.effective_gbps(1e9, 1.0) == 1.0
    # GPT-2's 124,439,808 fp32 elements with centered + momentum in 0.5 s
    assert bench.effective_gbps(36 * 124_439_808, 0.5) == pytest.approx(8.95966618, rel=1e-9)


def test_step_stats_median_and_quartiles():
    stats = bench.step_stats([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats["median_s"], stats["q1_s"], stats["q3_s"], stats["min_s"], stats["max_s"], stats["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    single = bench.step_stats([0.25])
    assert single["median_s"] == single["q1_s"] == single["q3_s"] == 0.25
    with pytest.raises(ValueError):
        bench.step_stats([])


def test_paired_speedup_is_the_median_of_per_round_ratios():
    def measurement(impl, times):
        return bench.Measurement("tiny", 1, 1000, "fp32", "plain", impl, 20, "torch-forloop", times_s=times, interleaved=True)

    # a load burst in round 2 slows both alike: per round the baseline is 3x, 3x, 3x slower
    baseline, fused = measurement("torch-forloop", [0.3, 3.0, 0.6]), measurement("fused-cpu", [0.1, 1.0, 0.2])
    assert bench.paired_speedup(baseline, fused) == pytest.approx(3.0)
    assert bench.summarise(fused, [fused, baseline], {"copy_gbps": 1.0, "inplace_add_gbps": 1.0})["speedup_vs_default_paired"] == pytest.approx(3.0)
    fused.times_s = [0.1, 1.0]  # a step failed in the last round: pair the rounds both have
    assert bench.paired_speedup(baseline, fused) == pytest.approx(3.0)


def test_summarise_derives_bandwidth_fractions_and_speedups():
    def measurement(impl, times):
        return bench.Measurement("tiny", 1, 1000, "fp32", "plain", impl, 20, "torch-forloop", times_s=times)

    fused = measurement("fused-cpu", [0.1, 0.2, 0.3])
    case = [fused, measurement("torch-forloop", [0.8]), measurement("torch-foreach", [0.4])]
    row = bench.summarise(fused, case, {"copy_gbps": 1e-4, "inplace_add_gbps": 2e-4})
    assert row["min_bytes"] == 20_000
    assert row["gbps"] == pytest.approx(20_000 / 0.2 / 1e9)
    assert row["fraction_of_copy"] == pytest.approx(row["gbps"] / 1e-4)
    assert row["fraction_of_inplace_add"] == pytest.approx(row["gbps"] / 2e-4)
    assert row["speedup_vs_default"] == pytest.approx(4.0)
    assert row["speedup_vs_foreach"] == pytest.approx(2.0)
    assert row["speedup_vs_default_paired"] is None  # not interleaved: no rounds to pair
    # a skipped baseline leaves the speedup unknown, not wrong
    case[1].skipped = "not here"
    assert bench.summarise(fused, case, {"copy_gbps": 1.0, "inplace_add_gbps": 1.0})["speedup_vs_default"] is None


# ----------------------------------------------------------------------------- parameter lists


def test_gpt2_small_list():
    gpt2 = param_lists.gpt2_small()
    assert gpt2.n_tensors == 148 and gpt2.numel == 124_439_808
    assert gpt2.shapes[:3] == ((50257, 768), (1024, 768), (768,))
    assert gpt2.shapes.count((768, 2304)) == 12 and gpt2.shapes.count((3072, 768)) == 12


def test_resnet50_list_matches_torchvision_counts():
    resnet = param_lists.resnet50()
    assert resnet.n_tensors == 161 and resnet.numel == 25_557_032
    convs = [s for s in resnet.shapes if len(s) == 4]
    assert len(convs) == 53 and convs[0] == (64, 3, 7, 7)
    assert resnet.shapes[-2:] == ((1000, 2048), (1000,))


def test_many_small_list_is_seeded_and_in_range():
    a, b = param_lists.many_small(), param_lists.many_small()
    assert a.shapes == b.shapes and a.n_tensors == 2000
    assert all(1024 <= s[0] <= 16384 for s in a.shapes)
    assert param_lists.many_small(seed=1).shapes != a.shapes
    assert param_lists.huge().numel == 2**28


# ----------------------------------------------------------------------------- runner smoke tests


def _impls_here(dtype):
    return [n for n in ("fused-cpu", "fused-reference", "torch-forloop", "torch-foreach", "bnb")
            if bench.why_unavailable(n, torch.device("cpu"), dtype) is None or n == "bnb"]


@pytest.mark.parametrize("dtype_name, memory_budget", [("fp32", None), ("bf16", None), ("fp32", 0)],
                         ids=["fp32-interleaved", "bf16-interleaved", "fp32-one-after-another"])
def test_run_list_times_every_implementation_on_a_tiny_list(dtype_name, memory_budget):
    options = list(bench.OPTION_SETS.values())
    impls = _impls_here(bench.DTYPES[dtype_name])
    done = []
    results = bench.run_list(TINY, dtype_name, options, impls, torch.device("cpu"), QUICK_PLAN,
                             memory_budget=memory_budget, on_case_done=done.append)
    assert len(results) == len(options) * len(impls) and len(done) == len(options)
    for m in results:
        # a budget of 0 bytes fits no case; the oracle is always timed alone, with at most 3 steps
        assert m.interleaved == (memory_budget is None and m.impl != "fused-reference")
        assert m.default_impl == "torch-forloop"  # torch's CPU default
        if m.impl == "bnb":
            assert m.skipped  # not installed here, or refusing momentum / centered
            continue
        assert m.skipped is None, m.skipped
        assert len(m.warmup_s) == 1 and len(m.times_s) == 2 and all(t > 0 for t in m.times_s)
        assert len(m.page_faults) == 2 and all(f >= 0 for f in m.page_faults)
        assert m.min_bytes == TINY.numel * bench.min_bytes_per_element(bench.DTYPES[dtype_name], *bench.OPTION_SETS[m.options].kwargs().values())
    for case in done:
        rows = [bench.summarise(m, case, {"copy_gbps": 1.0, "inplace_add_gbps": 1.5}) for m in case]
        for row in rows:
            line = bench.format_row(row)
            assert line.startswith("tiny") and (("skipped" in line) == (row.get("skipped") is not None))


def test_every_timed_implementation_does_the_same_update():
    """The runner times real work: after three steps from the same start, every implementation's
    params equal torch's for-loop result."""
    results = {}
    for name in _impls_here(torch.float32):
        if name == "bnb":
            continue
        params = bench.make_params(TINY, torch.float32, torch.device("cpu"), seed=3)
        step = bench.make_impl(name).build(params, bench.OPTION_SETS["centered+momentum"])
        for _ in range(3):
            step()
        results[name] = [p.detach() for p in params]
    for name, params in results.items():
        for got, want in zip(params, results["torch-forloop"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_unavailable_implementations_say_why():
    assert "interpreter" in bench.why_unavailable("fused-triton", torch.device("cpu"), torch.float32)
    assert bench.why_unavailable("fused-reference", torch.device("cpu"), torch.float32) is None
    assert bench.why_unavailable("torch-forloop", torch.device("cpu"), torch.float32) is None
    bnb = bench.make_impl("bnb")
    assert "centered" in bnb.refuses(TINY, bench.OPTION_SETS["centered+momentum"])
    assert "momentum" in bnb.refuses(TINY, bench.OPTION_SETS["momentum"])
    assert bnb.refuses(TINY, bench.OPTION_SETS["plain"]) is None
    compiled = bench.make_impl("torch-compile", compile_max_tensors=2)
    assert "3-tensor" in compiled.refuses(TINY, bench.OPTION_SETS["plain"])


def test_memory_for_case_counts_params_grads_states_and_temporaries():
    gpt2 = param_lists.gpt2_small()
    nbytes = gpt2.numel * 4
    temporaries = 4 * gpt2.numel * 4  # four float32 list-sized intermediates
    assert bench.memory_for_case(gpt2, torch.float32, bench.OPTION_SETS["plain"], 1) == 3 * nbytes + temporaries
    assert bench.memory_for_case(gpt2, torch.float32, bench.OPTION_SETS["centered+momentum"], 3) == 11 * nbytes + temporaries
    assert bench.memory_for_case(gpt2, torch.bfloat16, bench.OPTION_SETS["plain"], 1) == 3 * nbytes // 2 + temporaries
    assert bench.available_memory(torch.device("cpu")) > 0


def test_quick_plan_and_case_selection():
    quick = bench.plan_cases(bench.parse_args(["--quick"]))
    assert quick == [("gpt2", "fp32", ("plain", "centered+momentum")), ("many-small", "fp32", ("plain",))]
    full = bench.plan_cases(bench.parse_args([]))
    assert len(full) == len(param_lists.LISTS) * 2 and all(len(o) == 3 for _, _, o in full)
    assert bench.plan_cases(bench.parse_args(["--quick", "--lists", "huge", "--dtypes", "bf16"])) == [
        ("huge", "bf16", tuple(bench.OPTION_SETS))]
    with pytest.raises(SystemExit):
        bench.plan_cases(bench.parse_args(["--lists", "gpt3"]))


def test_device_stem_is_a_file_name():
    assert bench.slug("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz") == "intel-xeon-platinum-8480"
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    stem = bench.device_stem(torch.device("cpu"))
    assert stem.startswith("cpu-") and stem.endswith(f"-{os.cpu_count()}c") and "/" not in stem


def test_main_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.LISTS, "tiny", lambda: TINY)
    impls = ",".join(n for n in _impls_here(torch.float32) if n != "bnb") + ",fused-triton"
    rc = bench.main(["--device", "cpu", "--out", str(tmp_path), "--lists", "tiny", "--options", "plain,momentum",
                     "--dtypes", "fp32", "--impls", impls, "--repeats", "2", "--min-time", "0",
                     "--bandwidth-log2-numel", "16"])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "skipping fused-triton for fp32" in out and "torch-forloop" in out
    # stderr is no terminal here (as in a log of `> log 2>&1`): no progress bar, the table alone
    assert captured.err == ""
    stem = tmp_path / bench.device_stem(torch.device("cpu"))
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cpu_count"] == os.cpu_count()
    assert report["finished"] and not list(tmp_path.glob("*.partial"))
    assert report["bandwidth"]["tiny"]["copy_gbps"] > 0 and report["bandwidth"]["tiny"]["inplace_add_gbps"] > 0
    rows = report["results"]
    assert {r["options"] for r in rows} == {"plain", "momentum"}
    table = out.splitlines()[out.splitlines().index(bench.COLUMNS) + 1:][:len(rows)]
    assert [line.split()[:4] for line in table] == [[r["list_name"], r["dtype"], r["options"], r["impl"]] for r in rows]
    for r in rows:
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["median_s"] / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / report["bandwidth"]["tiny"]["copy_gbps"])
        assert math.isfinite(r["speedup_vs_default"])
    png = stem.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_results_go_to_bench_out_unless_asked_and_every_option_says_what_it_does():
    """bench/results holds the committed runs: a run writes there only when told to."""
    assert bench.parse_args([]).out == os.path.join(ROOT, "bench", "out")
    options = [a for a in bench.make_parser()._actions if a.option_strings and a.dest != "help"]
    assert "device" in {a.dest for a in options}
    assert [a.option_strings[0] for a in options if not (a.help and len(a.help.split()) > 2)] == []


def test_page_faults_are_counted_per_step():
    if bench.minor_page_faults() is None:
        pytest.skip("getrusage is not available here")
    faults = []
    bench.timed_step(lambda: torch.ones(2**22).sum(), bench.cpu_timer, faults)  # 16 MiB of fresh pages
    assert len(faults) == 1 and faults[0] >= 0


def test_simple_progress_bar_writes_lines(capsys):
    bar = bench.SimpleProgress(total=2)
    bar.set_description_str("case")
    bar.update()
    bar.write("a row")
    bar.update()
    bar.close()
    assert "a row" in capsys.readouterr().out


@pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")
def test_fused_cpu_is_timed_when_built():
    assert "fused-cpu" in _impls_here(torch.float32)
