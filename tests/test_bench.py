"""`msdd bench`: quick runs through the CLI (CPU, seconds), the round scheduling and the config helpers."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import sys
import time

import pytest
import torch

from msdd import malloc
from msdd.cli import main
from msdd.config import load_config
from msdd.eval.bench import (CONTENDERS, NO_DIFFUSERS, at_resolution, measure_conv_peak, measure_matmul_peak,
                             rotated_orders)
from msdd.eval.bench.peak import matmul_peaks
from msdd.eval.bench.timing import time_contenders
from msdd.models import cpu_kernels
from msdd.models.layers import FP32_PACKING, ONEDNN_LINEAR
from msdd.tokenizer import Tokenizer

from conftest import tiny_config

REQUIRED = ("name", "img_per_s", "gflop_per_img", "achieved_gflops")
TOP_LEVEL = ("machine_peak_gflops", "dtype", "threads", "device", "batch_size", "resolution", "preset", "date",
             "command", "torch_version")
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _bench(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", "--quick", "--threads", "1", "--json", str(out), *args]) == 0
    return json.loads(out.read_text()), stdout.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run of every contender; the teacher guided at cfg 2 (tiny-64 itself decodes at cfg 1)."""
    return _bench(tmp_path_factory.mktemp("bench"), "--cfg", "2")


def test_rotated_orders():
    names = ["a", "b", "c", "d"]
    orders = rotated_orders(names, 8)
    assert all(sorted(o) == names for o in orders)
    for i in range(len(names)):  # over len(names) rounds each contender runs once in each position
        assert sorted(o[i] for o in orders[:4]) == names
    assert [o[0] for o in orders] == ["a", "b", "c", "d", "a", "b", "c", "d"]
    assert rotated_orders(["x", "y"], 2) == [["x", "y"], ["y", "x"]]
    assert rotated_orders(names, 0) == []


def test_a_timed_sample_repeats_a_short_call_until_it_lasts_min_time():
    calls = {"short": 0, "long": 0}

    def short():  # about 2 ms
        calls["short"] += 1
        time.sleep(0.002)

    def long():  # longer than min_time: one call per sample
        calls["long"] += 1
        time.sleep(0.03)

    t = time_contenders({"short": short, "long": long}, rounds=3, warmup=1, device=torch.device("cpu"),
                        log=lambda _: None, min_time=0.02)
    seconds, first = t.seconds, t.first
    assert t.peaks == {"short": [], "long": []}  # no probe given
    assert calls["long"] == 1 + 3  # warm-up rounds: one call each
    assert all(0.002 <= t < 0.01 for t in seconds["short"])  # seconds per call, not per sample
    # each timed sample: calls until it lasted 20 ms, so at least 3 of these (a sleep of 2 ms can take longer: a fixed
    # count of 10 failed once on a loaded machine)
    timed = calls["short"] - 1
    assert timed >= 3 * 3 and timed >= sum(int(0.02 / t) for t in seconds["short"])
    assert all(t >= 0.03 for t in seconds["long"]) and len(seconds["short"]) == 3
    assert first["short"] >= 0.002
    before = calls["short"]
    time_contenders({"short": short}, rounds=2, warmup=0, device=torch.device("cpu"), log=lambda _: None)
    assert calls["short"] == before + 2  # min_time 0 (the default here): one call per sample


def test_the_round_probe_runs_after_each_timed_sample_outside_it():
    events = []

    def decode():
        events.append("call")
        time.sleep(0.002)

    def probe():  # slow, so a probe inside a sample would show in its time
        events.append("probe")
        time.sleep(0.03)
        return 100.0 + len(events)

    t = time_contenders({"a": decode, "b": decode}, rounds=3, warmup=1, device=torch.device("cpu"),
                        log=lambda _: None, probe=probe)
    assert events.count("probe") == 2 * 3  # after every timed sample, none in the warm-up
    assert events[:3] == ["call", "call", "call"] and events[3] == "probe"  # warm-up a, b; then a's sample, its probe
    assert len(t.peaks["a"]) == len(t.peaks["b"]) == 3 and t.peaks["a"][0] == 104.0
    assert all(s < 0.02 for s in t.seconds["a"] + t.seconds["b"])  # the probe's 30 ms are in no sample


def test_first_is_the_warm_up_call_and_memory_the_last_rounds_sample():
    """Timings.first: a contender's very first call, the warm-up's (which builds kernels: here 0.3 s, later calls
    far less); Timings.memory: the peak of its sample in the last timed round (here the only one that allocates
    64 MiB)."""
    calls = []

    def decode():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        if len(calls) == 3:  # warm-up, round 1, round 2: one call each (min_time 0)
            torch.ones(16 * 2**20).add_(1)

    t = time_contenders({"a": decode}, rounds=2, warmup=1, device=torch.device("cpu"), log=lambda _: None)
    assert len(calls) == 3 and t.first["a"] >= 0.3 and all(s < 0.3 for s in t.seconds["a"])
    if t.memory["a"] is not None:  # measurable (Linux)
        assert t.memory["a"] >= 48


@pytest.mark.slow
def test_quick_report_has_every_contender(quick):
    report, stdout = quick
    assert all(k in report for k in TOP_LEVEL)
    assert report["preset"] == "tiny-64" and report["batch_size"] == 2 and report["threads"] == 1
    assert report["teacher_steps"] == [2, 2, 2, 2] and report["machine_peak_gflops"] > 0
    # probed before and after the timed rounds; the % is against the higher
    before, after = report["machine_peak_gflops_before"], report["machine_peak_gflops_after"]
    assert report["machine_peak_gflops"] == max(before, after) > 0
    assert report["conv_peak_gflops"] > 0
    assert report["command"].startswith("msdd bench --preset tiny-64")
    # the command tunes glibc malloc (msdd.malloc) unless told not to; the report says which held
    assert report["malloc"] == malloc.settings()
    assert ("malloc tuned" if report["malloc"] else "malloc as the environment has it") in stdout
    rows = {r["name"]: r for r in report["contenders"]}
    assert list(rows) == list(CONTENDERS)
    for name, r in rows.items():
        if name == "sd-vae" and not HAVE_DIFFUSERS:
            assert r["error"] == NO_DIFFUSERS and "img_per_s" not in r
            continue
        assert all(k in r for k in REQUIRED), name
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0 and r["achieved_gflops"] > 0
        assert r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"] and len(r["seconds"]) == 2
        assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / report["machine_peak_gflops"], rel=1e-3)
        # and against the probe after each of its samples: the median over rounds
        assert len(r["round_peaks_gflops"]) == 2 and min(r["round_peaks_gflops"]) > 0
        per_round = [r["gflop_per_img"] * 2 / s / p for s, p in zip(r["seconds"], r["round_peaks_gflops"])]
        assert r["fraction_of_round_peak"] == pytest.approx(sum(per_round) / 2, rel=1e-3)
        assert name in stdout
    assert rows["student"]["speed_vs_student"] == 1.0
    # encode, and encode + decode (the reference code's convention): FLOPs of the real encoder, added
    from msdd.config import load_config
    from msdd.eval.flops import encoder_flops
    from msdd.tokenizer import Tokenizer

    enc = encoder_flops(Tokenizer(load_config("tiny-64").model)) / 1e9
    assert rows["encoder"]["gflop_per_img"] == pytest.approx(enc, rel=1e-4)  # the report rounds
    assert rows["student+encoder"]["gflop_per_img"] == pytest.approx(rows["student"]["gflop_per_img"] + enc, rel=1e-4)


def test_quick_flop_ratios(quick):
    rows = {r["name"]: r for r in quick[0]["contenders"]}
    student, teacher, nocfg, single = (rows[n] for n in ("student", "teacher", "teacher-nocfg", "single-scale"))
    n = 2  # steps per stage
    assert student["steps"] == [1, 1, 1, 1] and student["cfg"] == 1.0 and student["passes_per_image"] == 4
    assert teacher["passes_per_image"] == 2 * n * 4 and nocfg["passes_per_image"] == n * 4
    # gflop_per_img and passes against a count of the timed decode: tests/test_flops.py (test_bench_*_rows_*)
    # every single-scale step runs at full resolution
    assert single["steps"] == [4 * n] and single["num_stages"] == 1 and single["cfg"] == 2.0
    assert single["gflop_per_img"] > nocfg["gflop_per_img"]
    if HAVE_DIFFUSERS:  # SD v1 VAE decoder: 622.2 GFLOP at 256 px (SPEC 11: 622), 38.76 at 64 px
        assert rows["sd-vae"]["gflop_per_img"] == pytest.approx(38.7609, rel=1e-3)


def test_contenders_subset_and_resolution_table(tmp_path):
    report, stdout = _bench(tmp_path, "--contenders", "student,teacher", "--resolutions", "32,64")
    assert [r["name"] for r in report["contenders"]] == ["student", "teacher"]
    assert "sd-vae" not in stdout and "single-scale" not in stdout
    table = report["resolution_table"]
    assert [row["resolution"] for row in table] == [32, 64]
    assert [row["num_stages"] for row in table] == [3, 4]
    assert all(row["stage_resolutions"][0] == 8 for row in table)  # the first stage keeps its resolution
    assert table[0]["teacher"]["steps"] == [2, 2, 2]
    for row in table:
        assert row["student"]["img_per_s"] > 0 and row["teacher"]["img_per_s"] > 0
    assert table[1]["student"]["gflop_per_img"] > table[0]["student"]["gflop_per_img"]
    assert table[1]["student"]["gflop_per_img"] == pytest.approx(report["contenders"][0]["gflop_per_img"])
    assert "decode cost against resolution" in stdout
    # its last column: how many times longer the teacher's decode takes than the student's
    lines = stdout.splitlines()
    rows = lines[lines.index("decode cost against resolution (one stage more per doubling)") + 2:][:2]
    for line, row in zip(rows, table):
        ratio = row["student"]["img_per_s"] / row["teacher"]["img_per_s"]
        assert int(line.split()[0]) == row["resolution"] and abs(float(line.split()[-1]) - ratio) <= 0.05 + 1e-9


def test_int8_row_in_fp32_and_bf16_runs(tmp_path):
    from msdd.models.precision import msdd_int8

    for dtype in ("fp32", "bf16"):
        report, _ = _bench(tmp_path, "--contenders", "student,student-int8", "--dtype", dtype)
        student, int8 = report["contenders"]
        rest = "bf16" if dtype == "bf16" and msdd_int8() else "fp32"  # torch.ao's int8 layers: fp32 around them
        assert int8["name"] == "student-int8" and int8["dtype"] == f"int8 matmuls, {rest} elsewhere"
        assert int8["gflop_per_img"] == student["gflop_per_img"] and int8["img_per_s"] > 0


def test_sd_vae_row_without_diffusers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    report, stdout = _bench(tmp_path, "--contenders", "student,sd-vae")
    rows = {r["name"]: r for r in report["contenders"]}
    assert rows["sd-vae"] == {"name": "sd-vae", "error": NO_DIFFUSERS}
    assert rows["student"]["img_per_s"] > 0
    assert NO_DIFFUSERS in stdout


def test_trained_model_directories(tmp_path):
    cfg = tiny_config().model  # 32 px, 3 stages
    Tokenizer(cfg).save_pretrained(tmp_path / "teacher")
    Tokenizer(dataclasses.replace(cfg, one_step=True)).save_pretrained(tmp_path / "student")
    report, _ = _bench(tmp_path, "--model", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                       "--contenders", "student,teacher,single-scale", "--steps", "1,2,1")
    rows = {r["name"]: r for r in report["contenders"]}
    assert report["resolution"] == 32 and report["preset"] is None and report["model"] == str(tmp_path / "teacher")
    assert rows["student"]["steps"] == [1, 1, 1] and rows["teacher"]["steps"] == [1, 2, 1]
    assert rows["single-scale"]["steps"] == [4]


@pytest.mark.parametrize("args", [
    ["--contenders", "student,vae"],
    ["--resolutions", "96"],
    ["--steps", "1,2"],
    ["--batch-size", "0"],
    ["--min-time", "-1"],
    ["--pipeline", "--min-time", "2"],
    ["--contenders", "student,teacher,student"],
    ["--min-time", "inf"],
    ["--cfg", "inf"],
    ["--model", "tiny-64-teacher", "--set", "model.decoder.depth=12"],
])
def test_bad_options(tmp_path, args, capsys):
    assert main(["bench", "--quick", "--json", str(tmp_path / "b.json"), *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert args[-2] in err or args[0] in err  # names the option
    assert not (tmp_path / "b.json").exists()


def test_at_resolution_adds_a_stage_per_doubling():
    paper = load_config("paper-256").model
    c512 = at_resolution(paper, 512)
    assert c512.flow.num_stages == 5 and c512.sampling.steps == (30,) * 5
    assert c512.stage_resolutions == load_config("paper-512").model.stage_resolutions
    assert at_resolution(paper, 128).stage_resolutions == (32, 64, 128)
    with pytest.raises(ValueError, match="power of two"):
        at_resolution(paper, 384)


def test_peak_probes_count_their_flops(monkeypatch):
    """GFLOP/s = FLOPs of the probed op / seconds: with a clock that advances 1 ms per reading, every timed
    call lasts 1 ms, so the probe returns the op's FLOPs / 1e6, checked against FlopCounterMode's count."""
    import time

    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    def flops_of(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    n, c, size = 64, 8, 8
    mm_flops = flops_of(lambda: torch.mm(torch.zeros(n, n), torch.zeros(n, n)))
    conv_flops = flops_of(lambda: F.conv2d(torch.zeros(1, c, size, size), torch.zeros(c, c, 3, 3), padding=1))
    clock = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 1e-3)
    matmul = measure_matmul_peak(torch.float32, threads=1, n=n, repeats=3)
    by_kernel = matmul_peaks(torch.float32, threads=1, n=n, repeats=3)  # torch.mm, oneDNN's linear (packed), msdd's
    conv = measure_conv_peak(torch.float32, threads=1, channels=c, size=size, repeats=3)
    monkeypatch.undo()
    assert matmul == pytest.approx(mm_flops / 1e-3 / 1e9, rel=1e-9)
    onednn = {"onednn linear", "onednn linear, packed"} if FP32_PACKING else {"onednn linear"}
    msdd = {"msdd linear"} if cpu_kernels.library() is not None else set()
    assert set(by_kernel) == ({"torch.mm", *onednn} if ONEDNN_LINEAR else {"torch.mm"}) | msdd
    assert all(v == pytest.approx(mm_flops / 1e-3 / 1e9, rel=1e-9) for v in by_kernel.values())
    assert conv == pytest.approx(conv_flops / 1e-3 / 1e9, rel=1e-9)
    # without n: each kernel's best over the two sizes of peak_sizes (here the larger, whose 1 ms does 8x the FLOPs)
    from msdd.eval.bench import peak

    assert peak.peak_sizes(torch.float32, torch.device("cpu")) == (1024, 2048)
    assert peak.peak_sizes(torch.bfloat16, torch.device("cpu")) == (2048, 4096)
    assert peak.peak_sizes(torch.float32, torch.device("cuda")) == (2048, 4096)
    monkeypatch.setattr(peak, "peak_sizes", lambda dtype, device: (n // 2, n))
    clock = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 1e-3)
    best = matmul_peaks(torch.float32, threads=1, repeats=3)
    monkeypatch.undo()
    assert "torch.mm" in best and all(v == pytest.approx(mm_flops / 1e-3 / 1e9, rel=1e-9) for v in best.values())


def test_matmul_peak_agrees_with_a_timed_matmul():
    """The probe's GFLOP/s against our own best-of-20 timing of the same 256 x 256 product (2 n^3 FLOPs),
    on one thread; a generous factor 3 for a shared machine."""
    import time

    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(20):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    ours = 2 * n**3 / best / 1e9
    probe = measure_matmul_peak(torch.float32, threads=1, n=n, repeats=20)
    assert ours / 3 < probe < ours * 3, (probe, ours)
    assert torch.get_num_threads() == previous  # the probe restores the thread count


def test_a_row_summarises_its_timings():
    """`summarize`: img/s from the median sample (not the fastest), GFLOP/s achieved and its fraction of the peak,
    the fraction of each round's own peak (the median over rounds), and the compile time as the first call's
    excess over the median; a contender that could not run keeps its error and info."""
    from msdd.eval.bench.models import Contender
    from msdd.eval.bench.run import summarize

    c = Contender("x", lambda: None, 3 * 10**9, {"steps": [1]})
    row = summarize(c, [0.1, 0.2, 0.4], 1.0, batch_size=2, peak_gflops=100.0, compiled=True,
                    round_peaks=[50.0, 100.0, 200.0])
    assert row["img_per_s"] == pytest.approx(10.0) and row["gflop_per_img"] == pytest.approx(3.0)
    assert row["achieved_gflops"] == pytest.approx(30.0) and row["fraction_of_peak"] == pytest.approx(0.3)
    # per round: 6 GFLOP / 0.1 s / 50, / 0.2 s / 100, / 0.4 s / 200 = 1.2, 0.3, 0.075 (mean 0.525)
    assert row["fraction_of_round_peak"] == pytest.approx(0.3)
    assert row["compile_seconds"] == pytest.approx(0.8) and row["first_call_seconds"] == 1.0
    assert row["steps"] == [1] and (row["seconds_min"], row["seconds_max"]) == (0.1, 0.4)
    assert "compile_seconds" not in summarize(c, [0.1], 1.0, 2, 100.0)
    failed = summarize(Contender("sd-vae", None, error="no", info={"a": 1}), None, None, 2, 100.0)
    assert failed == {"name": "sd-vae", "error": "no", "a": 1}


def test_speed_vs_student_is_the_rows_throughput_over_the_students():
    """A row 4x slower than the student (40 ms against 10 ms a call) reports about 0.25: its img/s over the
    student's, not the inverse."""
    from msdd.eval.bench.models import Contender
    from msdd.eval.bench.run import measure
    from msdd.eval.bench.settings import BenchSettings

    settings = BenchSettings(batch_size=2, rounds=2, warmup=0, min_time=0.0)
    rows = measure([Contender("student", lambda: time.sleep(0.01), 10**9),
                    Contender("teacher", lambda: time.sleep(0.04), 10**9),
                    Contender("sd-vae", None, error="no")], settings, 100.0, torch.device("cpu"), log=lambda _: None)
    student, teacher, failed = rows
    assert student["speed_vs_student"] == 1.0
    assert teacher["speed_vs_student"] == pytest.approx(teacher["img_per_s"] / student["img_per_s"], rel=1e-9)
    assert 0.1 < teacher["speed_vs_student"] < 0.6
    assert "speed_vs_student" not in failed


def test_at_resolution_extends_the_steps_with_the_last_stages():
    """A schedule of different steps per stage: a doubling adds a stage with the last stage's steps, a halving
    drops the last stage (the first stage keeps its resolution and steps)."""
    cfg = tiny_config().model  # 32 px, 3 stages
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, steps=(1, 2, 3)))
    up, up2, down = at_resolution(cfg, 64), at_resolution(cfg, 128), at_resolution(cfg, 16)
    assert up.sampling.steps == (1, 2, 3, 3) and up2.sampling.steps == (1, 2, 3, 3, 3)
    assert down.sampling.steps == (1, 2) and down.flow.num_stages == 2
    assert up.stage_resolutions[:3] == cfg.stage_resolutions and down.stage_resolutions == cfg.stage_resolutions[:2]


def test_peak_memory_counts_what_the_call_adds():
    """`call_with_peak_memory` on the CPU: the peak resident memory the call added to what was in use before,
    with the high-water mark reset first: a call that allocates nothing adds about nothing even after an earlier
    256 MiB allocation (its peak is not this call's), and a 64 MiB one adds about 64 MiB."""
    from msdd.eval.bench.memory import call_with_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched, then freed
    del big
    _, idle = call_with_peak_memory(lambda: None, cpu)
    if idle is None:  # not measurable here (not Linux)
        pytest.skip("no resident-set probe on this system")
    out, used = call_with_peak_memory(lambda: torch.ones(16 * 2**20).add_(1), cpu)
    assert out.shape == (16 * 2**20,)
    assert idle < 16 and 48 <= used < 112, (idle, used)


def test_a_flow_row_decodes_the_same_images_at_every_call():
    """A contender's decode reseeds its noise at every call: the timed calls decode the same images (one
    workload per round), the same as `decode_latents` of the row's fixed latents; another seed draws other noise."""
    from msdd.eval.bench.contenders import _latents, build_contenders, flow_contender
    from msdd.eval.bench.models import FlowModel

    cpu = torch.device("cpu")
    model = FlowModel.random(tiny_config().model, cpu)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a freshly built decoder's zero-initialised output layers ignore the noise: not these
        for p in model.decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    (c,) = build_contenders(("teacher",), model, model, (1, 1, 1), 1.0, 2, cpu)
    with torch.inference_mode():
        first, second = c.decode(), c.decode()
        again = c.decode_latents(_latents(model.config, 2, cpu))
        other = flow_contender("t", model, model.decoder, _latents(model.config, 2, cpu), (1, 1, 1), 1.0, seed=1)
        other_images = other.decode()
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, second) and torch.equal(first, again)
    assert not torch.allclose(first, other_images)


def test_the_round_probe_times_the_fastest_kernel_of_the_first_probe():
    """The probe after each timed sample (`fraction_of_round_peak`'s denominator) times only the kernel that was
    fastest in the run's first probe (the peak it stands for), at the sizes of `peak_sizes`, one call at the smaller
    size with --quick; it returns that kernel's GFLOP/s."""
    from msdd.eval.bench import run

    calls = []

    def recording_peaks(dtype, threads, device, n=None, repeats=5, only=None):  # what the probe asks for
        calls.append((n, repeats, only))
        return {only: 7.0}

    peaks = {"torch.mm": 10.0, "onednn linear": 30.0, "msdd linear": 20.0}
    cpu = torch.device("cpu")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run, "matmul_peaks", recording_peaks)
        assert run._round_probe(peaks, torch.float32, cpu, quick=False)() == 7.0
        assert run._round_probe(peaks, torch.float32, cpu, quick=True)() == 7.0
    assert calls == [(None, 3, "onednn linear"), (run.peak_sizes(torch.float32, cpu)[0], 1, "onednn linear")]


def test_the_runs_peak_probes_time_both_sizes_and_quick_ones_the_smaller():
    """The probes before and after the rounds: every kernel at both sizes of `peak_sizes`, best of 5 (n=None:
    `matmul_peaks` takes each kernel's best over them); --quick: the smaller size alone, best of 3, which the
    command's log names."""
    from msdd.eval.bench import run
    from msdd.eval.bench.settings import QUICK, BenchSettings

    calls = []

    def recording_peaks(dtype, threads, device, n=None, repeats=5, only=None):  # what the run asks the probe for
        calls.append((n, repeats, only))
        return {"torch.mm": 7.0}

    small = run.peak_sizes(torch.bfloat16, torch.device("cpu"))[0]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run, "matmul_peaks", recording_peaks)
        for quick in (False, True):
            logged = []
            settings = BenchSettings(**{**QUICK, "preset": "tiny-test", "dtype": "bf16", "contenders": ("student",),
                                        "threads": 1, "quick": quick})
            run.run_bench(settings, logged.append)
            probes = [c for c in calls if c[2] is None]  # not the round probe's (the test above)
            assert probes == ([(small, 3, None)] if quick else [(None, 5, None)]) * 2
            sizes = " and ".join(f"{n}^3" for n in run.peak_sizes(torch.bfloat16, torch.device("cpu")))
            assert f"(best of {f'{small}^3' if quick else sizes} bf16," in logged[0]
            calls.clear()


def test_the_resolution_table_times_the_given_student():
    """With a --student of its own (here a decoder one block shallower than the teacher's), the resolution table's
    student rows decode that student at each resolution, not the teacher's weights."""
    from msdd.eval.bench.models import FlowModel
    from msdd.eval.bench.run import resolution_table
    from msdd.eval.bench.settings import BenchSettings

    cpu = torch.device("cpu")
    teacher = FlowModel.random(tiny_config().model, cpu)
    depth = teacher.config.decoder.depth
    student = FlowModel.random(tiny_config(f"model.decoder.depth={depth - 1}").model, cpu)
    settings = BenchSettings(batch_size=1, rounds=1, warmup=0, min_time=0.0)
    (row,) = resolution_table(teacher, student, [16], (1, 1, 1), 1.0, settings, 100.0, cpu, log=lambda _: None)
    at16 = FlowModel.random(at_resolution(student.config, 16), cpu)  # the same decoder, rebuilt at 16 px
    shallow = sum(p.numel() for p in at16.decoder.parameters()) / 1e6
    assert row["resolution"] == 16 and row["student"]["steps"] == [1, 1]
    assert row["student"]["params_M"] == pytest.approx(shallow, rel=1e-4)
    assert row["teacher"]["params_M"] > row["student"]["params_M"]


def test_the_report_command_repeats_the_run():
    """`BenchSettings.command()` (the report's "command"): every option that differs from the defaults, what
    --quick set spelled out, the contender list only when it is not the default one; the CLI parses it back to
    the same options."""
    from msdd.cli import build_parser
    from msdd.eval.bench.settings import BenchSettings

    s = BenchSettings(steps=(1, 2, 1, 1), guidance=2.0, batch_size=2, warmup=1, rounds=2, min_time=0.0, threads=1,
                      contenders=("student", "teacher"), resolutions=(32, 64), ssdd_steps=3, quick=True)
    command = s.command()
    assert command == ("msdd bench --preset tiny-64 --steps 1,2,1,1 --cfg 2 --dtype fp32 --batch-size 2 --warmup 1 "
                       "--rounds 2 --min-time 0 --threads 1 --contenders student,teacher --resolutions 32,64 "
                       "--ssdd-steps 3 --device cpu --quick")
    args = build_parser().parse_args(command.split()[1:])
    assert (args.steps, args.guidance, args.contenders, args.resolutions) == ("1,2,1,1", 2.0, "student,teacher",
                                                                             "32,64")
    assert "--contenders" not in BenchSettings().command() and "--cfg" not in BenchSettings().command()


def test_every_bench_option_reaches_its_setting(tmp_path, monkeypatch):
    """`msdd bench` hands each option to the `BenchSettings` field of its name (`--cfg`: guidance), lists as
    tuples; `--quick` fills in only the options not given (run_bench replaced by one that keeps its settings)."""
    import msdd.eval.bench
    from msdd.eval.bench.settings import QUICK, BenchSettings

    class Seen(Exception):
        pass

    def keep(settings):
        raise Seen(settings)

    monkeypatch.setattr(msdd.eval.bench, "run_bench", keep)
    given = ["--preset", "tiny-64", "--set", "model.decoder.depth=1", "--student", "stu", "--dtype", "bf16",
             "--compile", "--batch-size", "3", "--resolution", "48", "--steps", "2,3,4,5", "--cfg", "1.5", "--rounds",
             "7", "--warmup", "4", "--min-time", "0.25", "--threads", "2", "--contenders", "teacher,student",
             "--resolutions", "32,64", "--ssdd-preset", "ssdd-tiny-64", "--ssdd-steps", "6", "--device", "cpu"]
    with pytest.raises(Seen) as seen:
        main(["bench", *given, "--json", str(tmp_path / "b.json")])
    assert seen.value.args[0] == BenchSettings(
        preset="tiny-64", overrides=("model.decoder.depth=1",), student="stu", dtype="bf16", compile=True,
        batch_size=3, resolution=48, steps=(2, 3, 4, 5), guidance=1.5, rounds=7, warmup=4, min_time=0.25, threads=2,
        contenders=("teacher", "student"), resolutions=(32, 64), ssdd_preset="ssdd-tiny-64", ssdd_steps=6)
    with pytest.raises(Seen) as seen:
        main(["bench", "--quick", "--model", "m", "--batch-size", "5", "--steps", "3", "--pipeline", "--gen-preset",
              "gen-tiny", "--gen-steps", "9", "--gen-cfg", "2.5", "--json", str(tmp_path / "b.json")])
    assert seen.value.args[0] == BenchSettings(**{**QUICK, "model": "m", "batch_size": 5, "steps": 3, "pipeline": True,
                                                  "gen_preset": "gen-tiny", "gen_steps": 9, "gen_cfg": 2.5,
                                                  "quick": True})
    assert seen.value.args[0].warmup == QUICK["warmup"] != BenchSettings.warmup


def test_pipeline_decoder_shares_use_the_timed_calls():
    """`decoder_shares` (--pipeline rows): the generator's seconds recorded inside every call, of which the last
    `rounds` were the timed ones (the first here is a slow warm-up call); each timed call's decoder share is its time
    less the generator's, over its time; the median over rounds. A row that did not run loses the record."""
    from msdd.eval.bench.pipeline import decoder_shares

    row = {"name": "student", "seconds": [1.0, 2.0], "seconds_median": 1.5, "generator_seconds": [5.0, 0.5, 0.5]}
    out = decoder_shares(row, rounds=2)
    assert out["generator_seconds_median"] == 0.5 and out["decoder_seconds_median"] == 1.0
    assert out["decoder_share"] == pytest.approx((0.5 + 0.75) / 2) and "generator_seconds" not in out
    assert decoder_shares({"name": "sd-vae", "error": "no", "generator_seconds": []}, 2) == {"name": "sd-vae",
                                                                                            "error": "no"}
