"""The scripts in benchmarks/ that no other test runs: each runs end to end at a tiny setting, in this process (as
`python benchmarks/NAME.py ...` would), and writes what benchmarks/README.md's figures are read from. Their timings
are not checked (speed is the scripts' business, not the tests'); that they still run on today's API is."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from msdd.cli import main
from msdd.models import cpu_kernels

from test_generator import gen_args

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
KERNELS = pytest.mark.skipif(not (cpu_kernels.cpu_supported() and cpu_kernels.library() is not None),
                             reason="msdd's CPU kernels do not run here")


def run_script(name: str, *args: str, monkeypatch) -> None:
    """`python benchmarks/<name>.py args...` in this process; the RNG, the thread count and the grad mode (a script
    may turn it off for its whole process) are restored after it."""
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / f"{name}.py"), *args])
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(), torch.enable_grad():
            runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code in (None, 0), f"{name} exited with {e.code}"
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@KERNELS
def test_attention_kernels(in_tmp, monkeypatch):
    run_script("attention_kernels", "--tokens", "64", "--repeats", "1", "--out", "a.json", monkeypatch=monkeypatch)
    rows = json.loads(Path("a.json").read_text())["rows"]
    assert {(r["dtype"], r["tokens"]) for r in rows} == {("bf16", 64), ("fp32", 64)}
    for r in rows:  # both kernels against float64 attention: the fused one about as close as PyTorch's flash kernel
        assert r["fused_ms"] > 0 and r["fused_max_abs_error"] < (0.05 if r["dtype"] == "bf16" else 1e-4), r
        assert r["fused_max_abs_error"] <= 2 * r["flash_max_abs_error"] + 1e-6, r


@KERNELS
def test_encode_norms(in_tmp, monkeypatch):
    run_script("encode_norms", "--preset", "tiny-64", "--rounds", "1", "--out", "e.json", monkeypatch=monkeypatch)
    report = json.loads(Path("e.json").read_text())
    assert report["preset"] == "tiny-64" and len(report["rows"]) == 2 and report["speedup"] > 0


def test_stage_drift(in_tmp, monkeypatch):
    run_script("stage_drift", "--model", "tiny-64", "--out", "s.json", monkeypatch=monkeypatch)
    stages = json.loads(Path("s.json").read_text())["stages"]
    assert [s["resolution"] for s in stages] == [8, 16, 32, 64]
    assert all(math.isfinite(s["psnr"]) and s["psnr"] > 15 for s in stages)


def test_tiling_seams(in_tmp, monkeypatch):
    run_script("tiling_seams", "--model", "tiny-64", "--overlaps", "8", "--out", "t.json", monkeypatch=monkeypatch)
    (row,) = json.loads(Path("t.json").read_text())["rows"]
    assert row["overlap"] == 8 and row["tiles"] > 1 and min(row["band_psnr"], row["interior_psnr"]) > 15


def test_shipped_grid(in_tmp, monkeypatch):
    run_script("shipped_grid", "--rows", "2", "--out", "g.png", monkeypatch=monkeypatch)
    width, height = Image.open("g.png").size
    assert width > 4 * height / 2  # five columns (real, bicubic, PCA, teacher, student) of two rows


def test_refiner_gauge(in_tmp, monkeypatch):
    run_script("refiner_gauge", "--width", "16", "--blocks", "1", "--steps", "2", "--crops", "300", "--out", "r.json",
               monkeypatch=monkeypatch)
    report = json.loads(Path("r.json").read_text())
    assert report["pca_held_out_psnr"] > 20 and report["curve"][-1]["step"] == 2


def test_learning_curves(in_tmp, monkeypatch):
    run_script("learning_curves", "--preset", "tiny-test", "--set", "train.pca_crops=300", "--run-dir", "run",
               "--steps", "2", "--every", "1", "--out", "l.json", monkeypatch=monkeypatch)
    report = json.loads(Path("l.json").read_text())
    assert [p["step"] for p in report["points"]] == [1, 2]
    assert all(p["heldout_one_step"]["psnr"] > 0 for p in report["points"])


def test_generator_scripts(in_tmp, monkeypatch, capsys):
    """generator_fd.py and generation_decoders.py on a generator trained for two steps."""
    assert main(["gen-train", "--tokenizer", "tiny-64", "--run-dir", "gen", "--max-steps", "2", *gen_args()]) == 0
    capsys.readouterr()
    run_script("generator_fd", "4", "gen/model", monkeypatch=monkeypatch)
    assert "gen/model" in capsys.readouterr().out
    run_script("generation_decoders", "gen/model", "4", "--json", "d.json", "--inception-weights", "none.pth",
               monkeypatch=monkeypatch)  # FID skipped: no Inception file offline
    report = json.loads(Path("d.json").read_text())
    assert report["samples"] == 4 and {"student", "teacher"} <= set(report["rows"])
