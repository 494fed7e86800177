"""The fidelity experiments run end to end in --quick mode and write the results table."""

import json

from msdd.cli import main


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
