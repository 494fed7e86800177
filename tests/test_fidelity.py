"""The fidelity experiments run end to end in --quick mode and write the results table; the helpers of the table
(step split, spread over seeds) and the image grids of the evaluation outputs."""

import json

import numpy as np
import pytest
import torch

from msdd.cli import main


@pytest.mark.slow
def test_fidelity_quick_writes_the_table(tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["fidelity", "--quick", "--out", str(out), "--total-steps", "6", "--set", "train.pca_crops=500",
                 "--ssdd-set", "train.pca_crops=500"]) == 0  # PCA fits of 10,000 crops took 90 of 128 s
    r = json.loads((out / "results.json").read_text())
    assert r["quick"] and r["seeds"] == 1 and r["budget_minutes"] <= 0.3
    variants = {(s["experiment"], s["variant"]) for s in r["summary"]}
    for v in [("teacher", "single-scale"), ("teacher", "3 stages"), ("teacher", "4 stages"),
              ("student", "single-scale"), ("student", "3 stages"), ("student", "4 stages"),
              ("teacher-cfg", "4 stages, cfg 2"), ("student-cfg", "4 stages, distill cfg 2"),
              ("baseline", "plain autoencoder"), ("ssdd", "teacher"), ("ssdd", "one-step student")]:
        assert v in variants, v
    assert any(s["experiment"] == "baseline" and s["variant"].startswith("bicubic") for s in r["summary"])
    students = [s for s in r["summary"] if s["experiment"] == "student"]
    assert {s["passes"] for s in students} == {1, 3, 4}  # one pass per stage
    # every row decoded as its experiment says: the teachers' split of the 6 steps, 30 steps per stage for
    # teacher-steps, the guidance sweep (two passes a step), the students one step per stage
    rows = {(s["experiment"], s["variant"]): (s["steps"], s["cfg"], s["passes"]) for s in r["summary"]}
    assert rows[("teacher", "single-scale")] == ([6], 1.0, 6) and rows[("teacher", "3 stages")] == ([2, 2, 2], 1.0, 6)
    assert rows[("teacher", "4 stages")] == ([2, 2, 1, 1], 1.0, 6)
    assert rows[("teacher-steps", "4 stages, 30 steps/stage")] == ([30] * 4, 1.0, 120)
    assert [rows[("teacher-cfg", f"4 stages, cfg {g:g}")] for g in (1.5, 2, 3)] == [([2, 2, 1, 1], g, 12)
                                                                                   for g in (1.5, 2.0, 3.0)]
    assert rows[("student", "4 stages")] == rows[("student-cfg", "4 stages, distill cfg 2")] == ([1] * 4, 1.0, 4)
    runs = out / "runs"  # the cfg-2 student distilled from a guided teacher; every job's training time reported
    assert {tag: json.loads((runs / tag / "config.json").read_text())["distill"]["cfg"]
            for tag in ("student-s4-seed0", "student-s4-cfg2-seed0")} == {"student-s4-seed0": 1.0,
                                                                          "student-s4-cfg2-seed0": 2.0}
    assert set(r["train_seconds"]) == {p.name for p in runs.iterdir()} and len(r["train_seconds"]) == 10
    for s in r["summary"]:
        assert 0 < s["psnr"]["mean"] < 60 and 0 < s["ssim"]["mean"] <= 1
    # its toy models are not rows of another table (were: reused by a tiny-64 run into the same --out, silently)
    assert main(["fidelity", "--out", str(out), "--seeds", "1", "--train-steps", "2", "--distill-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds runs/teacher-s1-seed0, a model of other settings than this table's (model." in err
    assert "model.decoder.heads: 2 -> 4" in err and err.endswith("pass a new --out, or the settings that made it\n")
    md = (out / "results.md").read_text()
    assert "| experiment | variant |" in md and "machine:" in md and "budget:" in md
    assert "- SSDD rows: ssdd-tiny-test with ['train.pca_crops=500']" in md  # which recipe the SSDD rows trained with
    assert ("teacher-steps", "4 stages, 30 steps/stage") in variants
    assert [g["goal"].split()[:2] for g in r["goals"]] == [["4-stage", "student"], ["4-stage", "teacher"],
                                                          ["student", "within"], ["student", "within"],
                                                          ["4", "stages"]]
    assert "| goal | measured (seed means) | met |" in md


def _row(exp, var, psnr, ssim, passes):
    return {"experiment": exp, "variant": var, "passes": passes, "psnr": {"mean": psnr}, "ssim": {"mean": ssim}}


def test_goals_are_checked_against_the_numbers():
    from msdd.eval.fidelity import goals

    summary = [_row("baseline", "bicubic 9px", 26.0, 0.68, 0), _row("teacher", "4 stages", 28.5, 0.80, 40),
               _row("teacher", "3 stages", 28.7, 0.81, 40), _row("student", "4 stages", 28.2, 0.79, 4),
               _row("teacher-steps", "4 stages, 30 steps/stage", 29.0, 0.82, 120)]
    met = {g["goal"]: g["met"] for g in goals(summary)}
    assert list(met.values()) == [True, False, False, False]  # +2.5 dB; 10x passes; -0.8 dB; 4 < 3 stages
    summary[4] = _row("teacher-steps", "4 stages, 30 steps/stage", 28.6, 0.80, 120)
    summary[2] = _row("teacher", "3 stages", 28.0, 0.79, 40)
    assert [g["met"] for g in goals(summary)] == [True, False, True, True]


def test_pca_goal_needs_one_db_over_the_linear_code():
    from msdd.eval.fidelity import goals

    summary = [_row("baseline", "PCA 256 components", 27.0, 0.73, 0), _row("student", "4 stages", 28.2, 0.79, 4)]
    assert [(g["goal"].split()[4], g["met"]) for g in goals(summary)] == [("PCA", True)]  # +1.2 dB
    summary[0] = _row("baseline", "PCA 256 components", 27.5, 0.73, 0)
    assert [g["met"] for g in goals(summary)] == [False]  # +0.7 dB


def test_teachers_split_the_total_steps_coarse_stages_first():
    """`split_steps`: the equal total step budget of Table 2 over the stages, the remainder to the coarse (cheap)
    stages; `teacher_config` sets it with the stage count, the name and the seed of one teacher."""
    from msdd.config import load_config
    from msdd.eval.fidelity import split_steps, teacher_config

    assert split_steps(10, 4) == (3, 3, 2, 2) and split_steps(6, 1) == (6,) and split_steps(7, 3) == (3, 2, 2)
    base = load_config("tiny-test")
    c = teacher_config(base, 3, 10, seed=5)
    assert c.model.flow.num_stages == 3 and c.model.sampling.steps == (4, 3, 3)
    assert c.name == f"{base.name}-s3" and c.train.seed == 5


def test_spread_is_the_sample_standard_deviation_over_seeds():
    """A table cell over seeds: mean and the sample (n - 1) standard deviation, 0 for one seed; shown as
    'mean ± std' only over several seeds."""
    from msdd.eval.fidelity import _fmt, spread

    s = spread([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "values": [1.0, 2.0, 3.0]}
    assert spread([4.0])["std"] == 0.0
    assert _fmt(s, 2) == "2.00 ± 1.00" and _fmt(spread([4.0]), 1) == "4.0" and _fmt(None, 1) == "-"


def test_grid_columns_rows_and_labels():
    """`grid_image` (the reconstruction grids): [-1, 1] mapped to 0..255, one row per image and one column per
    tensor, smaller columns nearest-upsampled to the largest, white padding; a label too wide for its column is
    cut to fit, so that it never runs over the next column's."""
    from msdd.eval.grid import HEADER, grid_image

    size, pad = 16, 2
    gray = torch.zeros(2, 3, size, size)  # 0 -> mid gray
    small = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).expand(2, 3, 2, 2)  # 2 x 2 checks, upsampled to 8 x 8 blocks
    img = np.asarray(grid_image([gray, small], pad=pad))
    assert img.shape == (2 * (size + pad) + pad, 2 * (size + pad) + pad, 3)
    assert (img[pad:pad + size, pad:pad + size] == 128).all()  # row 0, column 0
    x = pad + size + pad  # column 1
    for y in (pad, pad + size + pad):  # both rows
        assert (img[y:y + 8, x:x + 8] == 0).all() and (img[y:y + 8, x + 8:x + 16] == 255).all()
        assert (img[y + 8:y + 16, x:x + 8] == 255).all() and (img[y + 8:y + 16, x + 8:x + 16] == 0).all()
    assert (img[:pad] == 255).all() and (img[:, :pad] == 255).all()
    labelled = np.asarray(grid_image([gray, small], pad=pad, labels=["a very long column label", ""]))
    assert labelled.shape == (img.shape[0] + HEADER, *img.shape[1:])
    assert (labelled[:HEADER, :x] < 128).any()  # the first label is drawn...
    assert (labelled[:HEADER, x:] == 255).all()  # ...and stops before the second column
    assert (labelled[HEADER:] == img).all()


def test_the_budget_is_split_by_job_weight(tmp_path):
    """The minutes per unit of job weight: per seed 4 teachers (3 msdd, 1 SSDD) and a plain autoencoder of weight 2,
    5 students (one more: distill cfg 2) of weight 1, so 15 units per seed; --quick caps the budget at 0.3 min
    and one seed."""
    from msdd.eval.fidelity import Fidelity

    def unit(minutes, seeds, quick=False):
        return Fidelity(tmp_path, minutes, preset="tiny-64", seeds=seeds, quick=quick).unit

    assert unit(15, 1) == pytest.approx(1.0) and unit(15, 2) == pytest.approx(0.5)
    assert unit(15, 3, quick=True) == pytest.approx(0.3 / 15)
    with pytest.raises(ValueError, match="--total-steps 3"):
        Fidelity(tmp_path, 15, total_steps=3)
