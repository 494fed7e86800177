"""The fidelity experiments run end to end in --quick mode and write the results table."""

import json

from msdd.cli import main


def test_fidelity_quick_writes_the_table(tmp_path):
    out = tmp_path / "fid"
    assert main(["fidelity", "--quick", "--out", str(out), "--total-steps", "6"]) == 0
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
    md = (out / "results.md").read_text()
    assert "| experiment | variant |" in md and "machine:" in md and "budget:" in md
