"""CLI smoke tests: real commands on tiny configs and real image files."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from msdd.cli import main

from conftest import TINY


def _tiny_args():
    return [a for o in TINY for a in ("--set", o)]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "reconstruct", "info", "demo", "latent-stats"):
        assert cmd in out


def test_info_preset(capsys):
    assert main(["info", "--preset", "paper-256"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["resolution"] for s in info["stages"]] == [32, 64, 128, 256]
    assert [s["image_tokens"] for s in info["stages"]] == [16, 64, 256, 1024]
    assert 240 < info["params_decoder_M"] < 260
    # 30 steps per stage with CFG (two passes per step) = 60 one-step decodes
    assert info["decode"]["gflop_per_image"] == pytest.approx(60 * info["decode"]["one_step_gflop_per_image"], rel=1e-3)


def test_info_step_time(capsys):
    overrides = ["--set", "train.batch_size=4", "--set", "model.decoder.depth=1", "--set", "model.encoder.depth=1"]
    assert main(["info", "--preset", "tiny-64", *overrides, "--step-time", "1"]) == 0
    step = json.loads(capsys.readouterr().out)["train_step"]
    assert step["batch_size"] == 4 and step["rounds"] == 1
    assert step["fp32_s_per_step"] > 0 and step["bf16_s_per_step"] > 0
    assert step["bf16_speedup"] == pytest.approx(step["fp32_s_per_step"] / step["bf16_s_per_step"], rel=1e-2)
    with pytest.raises(SystemExit, match="not --model"):
        main(["info", "--model", "tiny-64", "--step-time", "1"])


def test_train_then_reconstruct_then_info(tmp_path, photo_folder, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "20", *_tiny_args()]) == 0
    model = run / "model"
    assert (model / "model.safetensors").exists()
    out = tmp_path / "rec"
    assert main(["reconstruct", str(photo_folder), "--model", str(model), "--out", str(out), "--steps", "1,2,1"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 6 and all(float(r["psnr_db"]) > 0 for r in rows)
    assert (out / "grid.png").exists() and len(list((out / "reconstructions").glob("*.png"))) == 6
    capsys.readouterr()
    assert main(["info", "--model", str(model)]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 32
    assert main(["latent-stats", "--model", str(model), "--data", str(photo_folder), "--max-images", "6"]) == 0


def test_reconstruct_bad_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", *_tiny_args()]) == 0
    model = str(run / "model")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(small)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["reconstruct", str(small), "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "smaller than the model resolution 32" in capsys.readouterr().err
    assert main(["reconstruct", str(corrupt), "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "corrupt.png" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["reconstruct", str(empty), "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "no image" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit):
        main(["reconstruct", str(small), "--model", model, "--steps", "a,b"])


@pytest.mark.parametrize(
    "args, match",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "decoder.depht=2"], "unknown config key"),
        (["--set", "train.lr=fast"], "expected a number"),
        (["--set", "decoder.heads=5"], "divisible by heads"),
    ],
)
def test_bad_config_errors(tmp_path, capsys, args, match):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "1", *args]) == 2
    assert match in capsys.readouterr().err


def test_train_on_empty_folder_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "1", *_tiny_args(),
                 "--set", f"data.source={tmp_path / 'empty'}"]) == 2
    assert "empty" in capsys.readouterr().err


def test_demo_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.05", "--out", str(out), *_tiny_args()]) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["eval_set"]["images"] == 42
    for key in ("teacher", "student", "bicubic"):
        assert 5 < metrics[key]["psnr"] < 60 and 0 < metrics[key]["ssim"] <= 1
    assert metrics["bicubic"]["floats"] <= metrics["latent"]["floats"]
    assert metrics["student"]["decoder_passes"] == 3 and metrics["teacher"]["decoder_passes"] == 6
    assert metrics["stage1"]["steps"] >= 10 and metrics["stage2"]["steps"] >= 10
    assert (out / "report" / "grid.png").exists()
    assert "bicubic" in (out / "report" / "summary.md").read_text()
    assert "msdd demo" in capsys.readouterr().out


def test_demo_stops_when_a_stage_is_interrupted(tmp_path):
    """A stage stopped by SIGTERM ends the demo with 128 + 15 instead of going on without its model."""
    from msdd.demo import _stop_if_interrupted

    with pytest.raises(SystemExit) as e:
        _stop_if_interrupted({"interrupted": "SIGTERM"}, tmp_path)
    assert e.value.code == 143
    assert _stop_if_interrupted({"interrupted": None}, tmp_path) == {"interrupted": None}
