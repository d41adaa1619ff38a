"""The benchmark's arithmetic (byte model, GB/s, statistics, goals), its parameter lists, the
roofline kernels (every element of every stream read and written, on the CPU op and on the Triton
kernel in its interpreter), and a smoke run of its case runner and command line on tiny tensors.
Nothing here asserts on a timing."""

import json
import math
import os
import sys

import pytest
import torch

from common import assert_close, available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_step as bench  # noqa: E402
import byte_model  # noqa: E402
import param_lists  # noqa: E402
import roofline  # noqa: E402
from rmsprop_fused import FusedRMSprop  # noqa: E402

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
        return bench.Measurement("tiny", 1, 1000, "fp32", "plain", impl, 20_000, "torch-forloop", times_s=times, interleaved=True)

    # a load burst in round 2 slows both alike: per round the baseline is 3x, 3x, 3x slower
    baseline, fused = measurement("torch-forloop", [0.3, 3.0, 0.6]), measurement("fused-cpu", [0.1, 1.0, 0.2])
    assert bench.paired_speedup(baseline, fused) == pytest.approx(3.0)
    assert bench.summarise(fused, [fused, baseline], {"copy_gbps": 1.0, "inplace_add_gbps": 1.0})["speedup_vs_default_paired"] == pytest.approx(3.0)
    fused.times_s = [0.1, 1.0]  # a step failed in the last round: pair the rounds both have
    assert bench.paired_speedup(baseline, fused) == pytest.approx(3.0)


def test_summarise_derives_bandwidth_fractions_and_speedups():
    def measurement(impl, times, min_bytes=20_000, storage="fp32"):
        return bench.Measurement("tiny", 1, 1000, "fp32", "plain", impl, min_bytes, "torch-forloop", times_s=times,
                                 storage=storage, state_bytes=4000)

    fused = measurement("fused-cpu", [0.1, 0.2, 0.3])
    eight = measurement("fused-cpu:8bit", [0.1], min_bytes=14_000, storage="8bit")
    case = [fused, measurement("torch-forloop", [0.8]), measurement("torch-foreach", [0.4]), measurement("roofline", [0.16]),
            eight, measurement("roofline:8bit", [0.07], min_bytes=14_000, storage="8bit")]
    row = bench.summarise(fused, case, {"copy_gbps": 1e-4, "inplace_add_gbps": 2e-4})
    assert row["min_bytes"] == 20_000 and row["bytes_per_element"] == 20 and row["state_bytes_per_param"] == 4
    assert row["gbps"] == pytest.approx(20_000 / 0.2 / 1e9)
    assert row["fraction_of_copy"] == pytest.approx(row["gbps"] / 1e-4)
    assert row["fraction_of_inplace_add"] == pytest.approx(row["gbps"] / 2e-4)
    assert row["fraction_of_rated"] is None  # no rated figure (a CPU)
    assert row["speedup_vs_default"] == pytest.approx(4.0)
    assert row["speedup_vs_foreach"] == pytest.approx(2.0)
    assert row["speedup_vs_default_paired"] is None  # not interleaved: no rounds to pair
    # the roofline of the same streams: 20,000 bytes in 0.16 s against 0.2 s
    assert row["roofline_impl"] == "roofline" and row["fraction_of_roofline"] == pytest.approx(0.8)
    assert row["speedup_over"] == pytest.approx({"torch-forloop": 4.0, "torch-foreach": 2.0, "roofline": 0.8,
                                                 "fused-cpu:8bit": 0.5, "roofline:8bit": 0.35})
    # 8-bit state is held against the 8-bit roofline, by bytes: 14,000 in 0.07 s against 0.1 s
    row8 = bench.summarise(eight, case, {"copy_gbps": 1.0, "inplace_add_gbps": 1.0, "rated_gbps": 2e-4})
    assert row8["roofline_impl"] == "roofline:8bit" and row8["fraction_of_roofline"] == pytest.approx(0.7)
    assert row8["fraction_of_rated"] == pytest.approx(14_000 / 0.1 / 1e9 / 2e-4)
    assert "fraction_of_roofline" not in bench.summarise(case[3], case, {"copy_gbps": 1.0, "inplace_add_gbps": 1.0})
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


def _impls_here(dtype, extra=()):
    return [n for n in ("fused-cpu", "fused-reference", "roofline", "torch-forloop", "torch-foreach", "bnb") + tuple(extra)
            if bench.why_unavailable(n, torch.device("cpu"), dtype) is None or n.startswith("bnb")]


@pytest.mark.parametrize("dtype_name, memory_budget", [("fp32", None), ("bf16", None), ("fp32", 0)],
                         ids=["fp32-interleaved", "bf16-interleaved", "fp32-one-after-another"])
def test_run_list_times_every_implementation_on_a_tiny_list(dtype_name, memory_budget):
    options = [bench.OPTION_SETS[o] for o in bench.BASE_OPTIONS]
    dtype = bench.DTYPES[dtype_name]
    impls = _impls_here(dtype, extra=("fused-cpu:8bit", "fused-cpu:bf16", "roofline:8bit", "bnb:8bit"))
    done = []
    results = bench.run_list(TINY, dtype_name, options, impls, torch.device("cpu"), QUICK_PLAN,
                             memory_budget=memory_budget, on_case_done=done.append)
    assert len(results) == len(options) * len(impls) and len(done) == len(options)
    for m in results:
        # a budget of 0 bytes fits no case; the oracle is always timed alone, with at most 3 steps
        assert m.interleaved == (memory_budget is None and m.impl != "fused-reference")
        assert m.default_impl == "torch-forloop"  # torch's CPU default
        if m.impl.startswith("bnb") and (m.options != "plain" or bench.why_unavailable(m.impl, torch.device("cpu"), dtype)):
            continue  # not installed here, or refusing momentum / centered
        assert m.skipped is None, m.skipped
        assert len(m.warmup_s) == 1 and len(m.times_s) == 2 and all(t > 0 for t in m.times_s)
        assert len(m.page_faults) == 2 and all(f >= 0 for f in m.page_faults)
        assert len(m.wall_s) == 2 and m.kernel_s is None  # kernel times are a GPU's
        state_format = bench.parse_impl(m.impl)[1] if not m.impl.startswith("bnb") else ("8bit" if m.impl == "bnb:8bit" else "fp32")
        assert m.state_format == state_format
        assert m.min_bytes == byte_model.step_bytes(TINY.shapes, dtype, bench.OPTION_SETS[m.options], state_format)
        if state_format == "param":
            assert m.min_bytes == TINY.numel * bench.min_bytes_per_element(dtype, *bench.OPTION_SETS[m.options].kwargs().values())
        if not m.impl.startswith("torch"):  # the state it holds is the state the byte model counts
            assert m.state_bytes == byte_model.state_bytes(TINY.shapes, dtype, bench.OPTION_SETS[m.options], state_format), m.impl
    for case in done:
        rows = [bench.summarise(m, case, {"copy_gbps": 1.0, "inplace_add_gbps": 1.5}) for m in case]
        for row in rows:
            line = bench.format_row(row)
            assert line.startswith("tiny") and (("skipped" in line) == (row.get("skipped") is not None))


def test_every_timed_implementation_does_the_same_update():
    """The runner times real work: after three steps from the same start, every implementation's
    params equal torch's for-loop result; the roofline's are as they were (the other
    implementations of a case step the same params)."""
    results = {}
    for name in _impls_here(torch.float32):
        if name == "bnb":
            continue
        if name == "roofline":
            params = bench.make_params(TINY, torch.float32, torch.device("cpu"), seed=3)
            start = [p.detach().clone() for p in params]
            step = bench.make_impl(name).build(params, bench.OPTION_SETS["centered+momentum"])
            for _ in range(3):
                step()
            assert all(torch.equal(p, s) for p, s in zip(params, start))
            continue
        params = bench.make_params(TINY, torch.float32, torch.device("cpu"), seed=3)
        step = bench.make_impl(name).build(params, bench.OPTION_SETS["centered+momentum"])
        for _ in range(3):
            step()
        results[name] = [p.detach() for p in params]
    for name, params in results.items():
        for got, want in zip(params, results["torch-forloop"]):
            assert_close(got, want, steps=3, name=name)  # three steps, a few roundings apart each


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
    assert bench.memory_for_case(gpt2, torch.float32, bench.OPTION_SETS["plain"], ["param"]) == 3 * nbytes + temporaries
    assert bench.memory_for_case(gpt2, torch.float32, bench.OPTION_SETS["centered+momentum"], ["param"] * 3) == 11 * nbytes + temporaries
    assert bench.memory_for_case(gpt2, torch.bfloat16, bench.OPTION_SETS["plain"], ["param"]) == 3 * nbytes // 2 + temporaries
    # 8-bit state is a quarter of fp32's (and a little); a GPU roofline's flat param and grad count too
    eight = bench.memory_for_case(gpt2, torch.float32, bench.OPTION_SETS["plain"], ["8bit"], param_copies=2)
    assert 4 * nbytes + nbytes // 4 + temporaries < eight < 4 * nbytes + nbytes // 4 * 1.03 + temporaries
    assert bench.available_memory(torch.device("cpu")) > 0


def test_quick_plan_and_case_selection():
    quick = bench.plan_cases(bench.parse_args(["--quick"]))
    assert quick == [("gpt2", "fp32", ("plain", "centered+momentum")), ("many-small", "fp32", ("plain",))]
    full = bench.plan_cases(bench.parse_args([]))
    base = [c for c in full if c[2] == bench.BASE_OPTIONS]
    assert len(base) == len(param_lists.LISTS) * 2 and len(full) == len(base) + len(bench.FULL_CLIP_CASES)
    # each clip case right after its list's own case in that dtype, so that one copy-bandwidth measurement serves both
    for list_name, dtype in bench.FULL_CLIP_CASES:
        where = full.index((list_name, dtype, bench.BASE_OPTIONS))
        assert full[where + 1] == (list_name, dtype, bench.CLIP_OPTIONS)
    assert bench.plan_cases(bench.parse_args(["--quick", "--lists", "huge", "--dtypes", "bf16"])) == [
        ("huge", "bf16", bench.BASE_OPTIONS)]
    assert bench.plan_cases(bench.parse_args(["--options", "plain+clip", "--lists", "gpt2"])) == [
        ("gpt2", "fp32", ("plain+clip",)), ("gpt2", "bf16", ("plain+clip",))]
    with pytest.raises(SystemExit):
        bench.plan_cases(bench.parse_args(["--lists", "gpt3"]))


def test_the_quick_plan_caps_a_slow_implementation_after_two_steps():
    """A step whose timed steps add up past the quick plan's max_time stops after two; a fast one
    still gets its five steps; the full plan has no cap."""
    def fake_timer(fn):
        return fn()

    def slow():
        return 2.0  # seconds a step, as the fake timer reports it

    def fast():
        return 0.01

    plan = bench.QUICK_PLAN
    assert plan.max_time is not None and plan.capped_repeats == 2
    _, times = bench.time_steps(slow, fake_timer, plan)
    assert times == [2.0, 2.0]
    _, times = bench.time_steps(fast, fake_timer, plan)
    assert len(times) == plan.repeats
    assert not bench.FULL_PLAN.capped([100.0] * 10)


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
    fused = [r for r in rows if r["impl"] == "fused-cpu"]
    if available("cpu"):  # the roofline column, in the table and the JSON
        assert roofline.load_cpu_op() is None  # (what built the extension builds it)
        assert all(r["roofline_impl"] == "roofline" and r["fraction_of_roofline"] > 0 for r in fused)
        for r in fused:
            line = table[rows.index(r)]
            assert f"{r['fraction_of_roofline']:.0%}" in line.split()[8]  # the "of roof" column
            assert f"{r['fraction_of_roofline']:.0%} of roofline" in out
    # the machine: the CPU's model and flags (the kernel's vector width follows them), the load
    env = report["environment"]
    assert env["cpu_model"] and env["cpu_model"] in out.splitlines()[0]
    assert env["cpu_flags"] == bench.cpu_flags() and (not env["cpu_flags"] or "fpu" in env["cpu_flags"])
    assert env["cpu_kernel_clone"] == bench.x86_64_level(env["cpu_flags"]) and env["load_average_1_5_15min"]
    simd = "avx512-bf16" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi", "avx512_bf16"} <= set(env["cpu_flags"]) else ""
    assert env["cpu_simd_loop"] == (simd if available("cpu") else None)
    if available("cpu"):
        from rmsprop_fused import _extension

        assert env["cpu_prefetch_bytes"] == _extension._module.cpu_prefetch_bytes() > 0
    if os.path.exists("/proc/cpuinfo") and "cpu family" in open("/proc/cpuinfo").read():
        assert env["cpu_generation"].startswith("family ") and ", model " in env["cpu_generation"]
    assert report["state_bytes_per_param"]["tiny"]["fp32"]["plain"]["param"] == 4.0
    assert "optimizer state, bytes per param" in out
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


# ----------------------------------------------------------------------------- byte model of smaller state


def test_8bit_state_is_a_byte_and_a_shared_scale_per_element_and_small_tensors_keep_float32():
    eight = byte_model.state_tensor_bytes("8bit", torch.float32, 1 << 20)
    assert eight == (1 << 20) + 4 * (1 << 12)  # codes + one float32 scale per 256
    assert eight / (1 << 20) == pytest.approx(1.015625)
    assert byte_model.state_tensor_bytes("8bit", torch.float32, 4095) == 4095 * 4  # under 4,096: float32
    assert byte_model.state_tensor_bytes("8bit", torch.bfloat16, 4096) == 4096 + 4 * 16
    assert byte_model.state_tensor_bytes("8bit", torch.float32, 5000) == 5000 + 4 * 20  # a partial last block has a scale
    assert byte_model.state_tensor_bytes("bf16", torch.float32, 10) == 20
    assert byte_model.state_tensor_bytes("param", torch.float64, 10) == 80


@pytest.mark.parametrize("list_name", ["gpt2", "resnet50"])
def test_8bit_state_comes_to_about_1_02_bytes_per_state_tensor_per_param(list_name):
    """Issue #12: 'about 1.02 bytes per state tensor per param'; the small tensors kept in float32
    add a little over the 1.0156 of the large ones."""
    plist = param_lists.LISTS[list_name]()
    table = bench.state_bytes_table([plist], ["fp32", "bf16"], list(bench.BASE_OPTIONS))[list_name]
    for dtype_name, by_options in table.items():
        for name, formats in by_options.items():
            tensors = bench.OPTION_SETS[name].state_tensors
            assert 1.0156 < formats["8bit"] / tensors < 1.025, (dtype_name, name, formats)
            assert formats["param"] == tensors * bench.DTYPES[dtype_name].itemsize
    assert set(table["fp32"]["plain"]) == {"param", "bf16", "8bit"} and set(table["bf16"]["plain"]) == {"param", "fp32", "8bit"}


@pytest.mark.parametrize("options", ["plain", "momentum", "centered+momentum"])
@pytest.mark.parametrize("state_format", ["param", "bf16", "8bit"])
def test_the_byte_model_counts_the_state_that_fused_rmsprop_keeps(options, state_format):
    """The model's state bytes against the nbytes of the state FusedRMSprop creates, for a list
    with tensors on both sides of the 8-bit threshold and a partial last block."""
    shapes = ((4096,), (5000,), (17,), (64, 65))
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    option_set = bench.OPTION_SETS[options]
    optimizer = FusedRMSprop(params, lr=1e-3, backend="reference", state_dtype=byte_model.state_dtype_argument(state_format),
                             **option_set.kwargs())
    optimizer.step()
    measured = bench.Step(optimizer.step, optimizer=optimizer).state_bytes()
    assert measured == byte_model.state_bytes(shapes, torch.float32, option_set, state_format)


def test_step_bytes_add_the_norms_read_when_clipping():
    shapes = ((1000,),)
    for options in ("plain", "centered+momentum"):
        clip = bench.OPTION_SETS[options + "+clip"]
        assert byte_model.step_bytes(shapes, torch.float32, clip) == byte_model.step_bytes(shapes, torch.float32, bench.OPTION_SETS[options]) + 4000
    # 8-bit plain: the param and grad read (8), the param written (4), codes read and written (2), scales
    assert byte_model.step_bytes(((4096,),), torch.float32, bench.OPTION_SETS["plain"], "8bit") == 4096 * 14 + 2 * 4 * 16


def test_state_formats_apply_where_fused_rmsprop_takes_them():
    assert byte_model.why_format_does_not_apply("8bit", torch.float32) is None
    assert byte_model.why_format_does_not_apply("bf16", torch.float32) is None
    assert "own" in byte_model.why_format_does_not_apply("fp32", torch.float32)
    assert "own" in byte_model.why_format_does_not_apply("bf16", torch.bfloat16)
    assert "float64" in byte_model.why_format_does_not_apply("8bit", torch.float64)
    assert "fp32" in bench.why_unavailable("fused-cpu:fp32", torch.device("cpu"), torch.float32)
    assert byte_model.state_dtype_argument("8bit") == "8bit" and byte_model.state_dtype_argument("param") is None
    assert byte_model.state_dtype_argument("bf16") == torch.bfloat16


# ----------------------------------------------------------------------------- the roofline


def _bits(t, signed=False):
    """A tensor's elements as their bit patterns (int64, flat): unsigned, or sign-extended."""
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    width = t.element_size()
    bits = t.reshape(-1).view(words[width]).to(torch.int64)
    return bits if signed or width == 8 else bits & ((1 << (8 * width)) - 1)


def _expected_after_flip(before, grad, sign_extends):
    """The roofline with an all-ones mask: x ^= the grad's bits, truncated to x's width, or widened
    (the C++ op zero-extends its unsigned words, Triton sign-extends its signed ones)."""
    width = before.element_size()
    mask = -1 if width == 8 else (1 << (8 * width)) - 1
    return (_bits(before) ^ _bits(grad, signed=sign_extends)) & mask


ROOFLINE_SHAPES = ((40_000,), (5000,), (17,), (4096,), (3, 333))  # > 32K elements: the parallel split has work


@pytest.mark.parametrize("options", ["plain", "centered+momentum", "momentum"])
@pytest.mark.parametrize("dtype, state_format", [(torch.float32, "param"), (torch.float32, "bf16"), (torch.float32, "8bit"),
                                                 (torch.bfloat16, "param"), (torch.bfloat16, "fp32"), (torch.bfloat16, "8bit"),
                                                 (torch.float16, "8bit"), (torch.float64, "param")], ids=str)
@pytest.mark.parametrize("kernel", ["cpu", "triton-interpreter"])
def test_the_roofline_reads_and_writes_every_element_of_every_stream(kernel, dtype, state_format, options):
    """With the mask all ones, every element of the param and of each state tensor (and each 8-bit
    scale) must change to itself ^ the grad's bits, and the grad stay as it was; with the mask zero
    (as timed) nothing changes. So the kernel reads the grad and reads and writes every other stream."""
    if kernel == "cpu":
        _require_the_cpu_roofline_op()
    elif os.environ.get("TRITON_INTERPRET") != "1" or pytest.importorskip("triton") is None:
        pytest.skip("Triton's interpreter is on only when no GPU is visible (tests/conftest.py)")
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(dtype) for s in ROOFLINE_SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    option_set = bench.OPTION_SETS[options]
    streams = roofline.state_streams(params, [p.grad for p in params], option_set, state_format)
    assert {s.square_avgs[0].dtype for s in streams} == {byte_model.storage_dtype(state_format, dtype, p.numel()) for p in params}
    if kernel == "cpu":
        run, run_zero = roofline.cpu_step(streams, flip=True), roofline.cpu_step(streams, flip=False)
        views = streams
    else:
        flats = roofline.flatten(streams)
        run, run_zero = roofline.triton_step(flats, flip=True), roofline.triton_step(flats, flip=False)
        views = [roofline.Streams([f.param], [f.grad], [f.square_avg], [f.grad_avg] if f.grad_avg is not None else [],
                                  [f.momentum_buffer] if f.momentum_buffer is not None else [],
                                  *[[t] if t is not None else [] for t in f.scales]) for f in flats]
    before = [[t.clone() for t in s.tensors()] for s in views]
    run_zero()
    for s, was in zip(views, before):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(s.tensors(), was))
    run()
    names = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "square_avg_scales", "grad_avg_scales",
             "momentum_buffer_scales")
    for s, was in zip(views, before):
        old = {}
        flat = iter(was)
        for name, tensors in zip(names, s.lists()):
            old[name] = [next(flat) for _ in tensors]
        for t, (p, g) in enumerate(zip(s.params, s.grads)):
            assert torch.equal(_bits(g), _bits(old["grads"][t]))  # read only
            assert torch.equal(_bits(p), _expected_after_flip(old["params"][t], old["grads"][t], kernel != "cpu"))
            for name in ("square_avgs", "grad_avgs", "momentum_buffers"):
                if getattr(s, name):
                    expected = _expected_after_flip(old[name][t], old["grads"][t], kernel != "cpu")
                    assert torch.equal(_bits(getattr(s, name)[t]), expected), name
            for name in ("square_avg_scales", "grad_avg_scales", "momentum_buffer_scales"):
                if getattr(s, name):
                    assert torch.equal(_bits(getattr(s, name)[t]), _bits(old[name][t]) ^ 0xFFFFFFFF), name
    expected_calls = 2 if state_format == "8bit" else 1  # 8-bit: codes for the large tensors, float32 for the small
    assert len(streams) == expected_calls


def _require_the_cpu_roofline_op():
    """The roofline op builds wherever the extension did (the same compiler and headers): a build
    failure there is a failure, not a reason to skip."""
    reason = roofline.load_cpu_op()
    if reason and available("cpu"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def test_the_roofline_op_is_built_with_setup_pys_flags():
    _require_the_cpu_roofline_op()
    flags = roofline.setup_cxx_flags()
    assert {"-O3", "-ffp-contract=off", "-fno-math-errno"} <= set(flags)
    import glob

    from torch.utils.cpp_extension import _get_build_directory

    ninja = open(os.path.join(_get_build_directory("rmsprop_fused_bench_roofline", False), "build.ninja")).read()
    cflags = next(line for line in ninja.splitlines() if line.startswith("cflags"))
    assert all(f" {flag}" in cflags for flag in flags), (flags, cflags)
    assert os.path.join(ROOT, "csrc") in ninja and glob.glob(os.path.join(ROOT, "csrc", "cpu", "cpu_kernel.h"))


# ----------------------------------------------------------------------------- implementations


def test_clip_implementations_do_the_same_update():
    """In a clip case every implementation clips to MAX_NORM: FusedRMSprop inside its step,
    clip+fused-cpu and torch's after clip_grad_norm_; three steps end in the same params."""
    results = {}
    names = [n for n in ("fused-reference", "fused-cpu", "clip+fused-cpu", "torch-forloop", "torch-foreach")
             if bench.why_unavailable(n, torch.device("cpu"), torch.float32) is None]
    options = bench.OPTION_SETS["centered+momentum+clip"]
    for name in names:
        impl = bench.make_impl(name)
        assert impl.applies(options) and impl.applies(bench.OPTION_SETS["plain"]) != name.startswith("clip+")
        params = bench.make_params(TINY, torch.float32, torch.device("cpu"), seed=3)
        step = impl.build(params, options)
        for _ in range(3):
            step()
        results[name] = [p.detach() for p in params]
    unclipped = bench.make_params(TINY, torch.float32, torch.device("cpu"), seed=3)
    step = bench.make_impl("torch-forloop").build(unclipped, bench.OPTION_SETS["centered+momentum"])
    for _ in range(3):
        step()
    for name, params in results.items():
        for got, want in zip(params, results["torch-forloop"]):
            assert_close(got, want, steps=3, name=name)  # three steps, a few roundings apart each
    assert any(not torch.allclose(a, b) for a, b in zip(results["torch-forloop"], unclipped))  # the clip did something
    for name in ("torch-compile", "bnb", "roofline"):
        assert not bench.make_impl(name).applies(options)


def test_state_variants_keep_the_state_they_are_named_for():
    params = bench.make_params(param_lists.ParamList("t", "t", ((8192,), (10,))), torch.float32, torch.device("cpu"))
    for name, dtype in (("fused-cpu:8bit", torch.uint8), ("fused-cpu:bf16", torch.bfloat16)):
        if bench.why_unavailable(name, torch.device("cpu"), torch.float32):
            continue
        step = bench.make_impl(name).build(params, bench.OPTION_SETS["plain"])
        step()
        state = step.optimizer.state[params[0]]
        assert state["square_avg"].dtype == dtype


def test_the_compile_budget_leaves_torch_compile_out_once_spent():
    compiled = bench.make_impl("torch-compile", compile_budget_s=10.0)
    assert compiled.refuses(TINY, bench.OPTION_SETS["plain"]) is None
    compiled.after_warmup(6.0)
    assert compiled.refuses(TINY, bench.OPTION_SETS["plain"]) is None
    compiled.after_warmup(5.0)
    assert "compile budget is spent (11 s" in compiled.refuses(TINY, bench.OPTION_SETS["plain"])


def test_default_implementations_follow_quick_and_state_dtypes():
    quick = bench.default_impls(bench.parse_args(["--quick"]))
    assert "roofline" in quick and "fused-cpu" in quick
    assert not any(":" in n for n in quick) and "torch-compile" not in quick and "fused-reference" not in quick
    full = bench.default_impls(bench.parse_args([]))
    assert {"fused-cpu:8bit", "fused-cpu:bf16", "fused-cpu:fp32", "roofline:8bit", "bnb:8bit", "torch-compile", "clip+fused-cpu"} <= set(full)
    eight = bench.default_impls(bench.parse_args(["--state-dtypes", "8bit"]))
    assert {n for n in eight if ":" in n} == {"fused-cpu:8bit", "fused-cuda:8bit", "fused-triton:8bit", "roofline:8bit", "bnb:8bit"}
    assert not any(":" in n for n in bench.default_impls(bench.parse_args(["--state-dtypes", "none"])))
    with pytest.raises(SystemExit):
        bench.default_impls(bench.parse_args(["--state-dtypes", "4bit"]))
    assert bench.parse_impl("fused-cuda:8bit") == ("fused-cuda", "8bit") and bench.parse_impl("bnb") == ("bnb", "param")


# ----------------------------------------------------------------------------- GPU reporting, without a GPU


def test_rated_bandwidths_are_the_datasheets():
    assert bench.rated_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0  # the SXM part
    assert bench.rated_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert bench.rated_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert bench.rated_bandwidth_gbps("Some Future GPU") is None


def _row(list_name, dtype, options, impl, **values):
    return {"list_name": list_name, "dtype": dtype, "options": options, "impl": impl, "gbps": 1.0, "fraction_of_copy": 0.5,
            "skipped": None, **values}


def test_goals_are_read_off_the_rows():
    rows = [
        _row("gpt2", "fp32", "plain", "fused-cuda", kernel_fraction_of_copy=0.93, fraction_of_roofline=0.95,
             speedup_vs_foreach=2.4, speedup_vs_compile=1.1),
        _row("gpt2", "fp32", "plain", "fused-triton", fraction_of_copy=0.8),  # no kernel time: the step's
        _row("many-small", "fp32", "plain", "fused-cuda", speedup_vs_foreach=6.0),
        _row("resnet50", "bf16", "plain", "fused-cpu", fraction_of_roofline=0.85),
        _row("huge", "fp32", "plain", "fused-cpu", fraction_of_roofline=0.5),  # no goal for this list
    ]
    found = {(g["goal"], g["case"]): g for g in bench.goals(rows)}
    assert len(found) == 7
    copy = found[("fused-cuda >= 90% of the copy bandwidth", "gpt2 fp32 plain")]
    assert copy["met"] and copy["value"] == 0.93 and copy["basis"] == "kernel time"
    assert not found[("fused-cuda >= 2.5x torch foreach", "gpt2 fp32 plain")]["met"]
    assert found[("fused-cuda >= 1.0x the torch.compile'd step", "gpt2 fp32 plain")]["met"]
    triton = found[("fused-triton >= 85% of the copy bandwidth", "gpt2 fp32 plain")]
    assert not triton["met"] and triton["basis"] == "step time"
    assert found[("fused-cuda >= 5x torch foreach on many small tensors", "many-small fp32 plain")]["met"]
    assert not found[("fused-cpu >= 90% of the roofline", "resnet50 bf16 plain")]["met"]
    assert found[("fused-cuda >= 90% of the roofline", "gpt2 fp32 plain")]["met"]
    assert bench.format_goal(copy) == "met    fused-cuda >= 90% of the copy bandwidth: gpt2 fp32 plain: 93% (kernel time)"
    assert bench.format_goal(triton).startswith("MISSED")


def test_kernel_time_without_a_gpu_is_none_with_a_reason():
    seconds, note = bench.kernel_seconds(lambda: torch.ones(4).sum(), steps=1)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert seconds is None and note


def test_cpu_kernel_clone_follows_the_flags():
    v4 = ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
    if bench.x86_64_level([]) is None:
        pytest.skip("not x86-64")
    assert bench.x86_64_level(v4) == "x86-64-v4"
    assert bench.x86_64_level(v4[:8]) == "x86-64-v3"
    assert bench.x86_64_level(["sse2"]) == "default"


def test_step_overhead_prints_every_setting_per_param(monkeypatch, capsys):
    import step_overhead

    monkeypatch.setattr(sys, "argv", ["step_overhead.py", "--params", "3", "--rounds", "2", "--steps", "1"])
    step_overhead.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 one-element params")
    rows = lines[1:]
    assert len(rows) == len(step_overhead.SETTINGS)
    for row, name in zip(rows, step_overhead.SETTINGS):
        assert name in row
        per_param = float(row.split("us a step")[1].split("us a param")[0])
        assert 0 < per_param < 1e5 and row.rstrip().endswith("x as long")


def test_fp16_vs_bf16_prints_a_paired_ratio_per_option_set(monkeypatch, capsys):
    import fp16_vs_bf16

    tiny = param_lists.ParamList("tiny", "two tensors", ((33, 5), (70,)))
    monkeypatch.setitem(fp16_vs_bf16.param_lists.LISTS, "tiny", lambda: tiny)
    monkeypatch.setattr(sys, "argv", ["fp16_vs_bf16.py", "--list", "tiny", "--rounds", "3", "--threads", "1"])
    fp16_vs_bf16.main()
    lines = capsys.readouterr().out.splitlines()
    assert ", 1 thread," in lines[0] and "tiny, 3 rounds" in lines[0]
    rows = lines[1:]
    assert len(rows) == len(fp16_vs_bf16.OPTION_SETS)
    for row, name in zip(rows, fp16_vs_bf16.OPTION_SETS):
        assert row.split()[0] == name
        low, high = (float(x) for x in row.split("interquartile ")[1].rstrip(")").split("-"))
        assert 0 < low <= float(row.split("fp16 / bf16 ")[1].split()[0]) <= high


@pytest.mark.skipif(not available("cpu"), reason="the C++ extension is not built")
def test_prefetch_sweep_prints_paired_ratios_and_restores_the_distance(monkeypatch, capsys):
    import prefetch_sweep
    from rmsprop_fused import _extension

    default = _extension._module.cpu_prefetch_bytes()
    tiny = param_lists.ParamList("tiny", "two tensors", ((33, 5), (70,)))
    monkeypatch.setitem(prefetch_sweep.param_lists.LISTS, "tiny", lambda: tiny)
    monkeypatch.setattr(sys, "argv", ["prefetch_sweep.py", "--list", "tiny", "--rounds", "3", "--threads", "1",
                                      "--dtypes", "bf16", "--options", "plain,momentum", "--distances", "0,2048"])
    prefetch_sweep.main()
    lines = capsys.readouterr().out.splitlines()
    assert ", 1 thread," in lines[0] and f"default distance {default} B" in lines[0]
    rows = lines[2:]
    assert [row.split()[:3] for row in rows] == [["bf16", o, s] for o in ("plain", "momentum") for s in ("step", "roofline")]
    distances = sorted({0, 2048, default})
    for row in rows:
        cells = row.split(" B ")[1:]
        assert len(cells) == len(distances)
        for cell, d in zip(cells, distances):
            ratio = float(cell.split(" ms ")[1].split()[0])
            assert ratio == 1.0 if d == default else ratio > 0
    assert _extension._module.cpu_prefetch_bytes() == default
    assert torch.ops.rmsprop_fused_bench.set_prefetch_bytes(default) == default  # the roofline's too

    # a distance the op refuses: named before any tensor is made, and the default stays
    monkeypatch.setattr(sys, "argv", ["prefetch_sweep.py", "--list", "tiny", "--distances", "0,100"])
    monkeypatch.setattr(prefetch_sweep, "make_params", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(SystemExit, match="--distances: .*multiple of 64 bytes from 0 to 16384, got 100"):
        prefetch_sweep.main()
    assert _extension._module.cpu_prefetch_bytes() == default
    assert torch.ops.rmsprop_fused_bench.set_prefetch_bytes(default) == default


def test_divider_probe_compiles_and_prints_every_loop(tmp_path):
    """bench/divider_probe.c, the measurement behind docs/DESIGN.md section 4's bf16 bound: it
    compiles with the AVX-512 flags on any x86-64 gcc, and where the CPU has AVX-512 BF16 it
    runs every loop, on one thread or two, and refuses an element count that the threads
    cannot split into whole cache lines."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None or bench.x86_64_level([]) is None:
        pytest.skip("needs gcc on x86-64")
    binary = tmp_path / "divider_probe"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16",
                    os.path.join(ROOT, "bench", "divider_probe.c"), "-o", str(binary)], check=True)
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split() if os.path.exists("/proc/cpuinfo") else []
    if not {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"} <= set(flags):
        pytest.skip("compiled; running it needs AVX-512 BF16")
    for args in (["33"], ["2048", "0"], ["2080", "2"]):
        refused = subprocess.run([str(binary), *args], capture_output=True, text=True)
        assert refused.returncode == 2 and "multiple of 32 times the threads" in refused.stderr, args
    for args, threads in ((["2048"], "1 thread,"), (["4096", "2"], "2 threads,")):
        lines = subprocess.run([str(binary), *args], capture_output=True, text=True, check=True).stdout.splitlines()
        divider, loops = lines[1:6], lines[7:]
        assert lines[0].startswith("the divider")
        assert lines[6].startswith(f"the bf16 plain step, {args[0]} elements a stream, {threads}")
        assert all(float(row.split()[-2]) > 0 for row in divider)
        assert len(loops) == 6 and loops[0].rstrip().endswith("(1.00x the kernel's time)")
        assert all(float(row.split(" ns")[0].split()[-1]) > 0 for row in loops)
