"""CLI smoke tests: real commands on tiny configs and real image files."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from msdd.cli import main

from conftest import tiny_args


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
    assert info["decode"]["steps_per_stage"] == [30] * 4 and info["decode"]["cfg"] == 2.0
    assert info["one_step"] is False and info["recipe"]["stage2"]["discriminator"] == "dino"
    assert main(["info", "--model", "tiny-64"]) == 0  # the shipped student: described as trained, no preset recipe
    info = json.loads(capsys.readouterr().out)
    assert info["one_step"] is True and info["decode"]["steps_per_stage"] == [1] * 4 and "recipe" not in info
    # the GFLOP numbers against a count of the real decode: tests/test_flops.py (tiny-64, runnable on a CPU)


def test_info_step_time(capsys):
    overrides = ["--set", "train.batch_size=4", "--set", "model.decoder.depth=1", "--set", "model.encoder.depth=1"]
    assert main(["info", "--preset", "tiny-64", *overrides, "--step-time", "1"]) == 0
    step = json.loads(capsys.readouterr().out)["train_step"]
    assert step["batch_size"] == 4 and step["rounds"] == 1
    assert step["fp32_s_per_step"] > 0 and step["bf16_s_per_step"] > 0
    assert step["bf16_speedup"] == pytest.approx(step["fp32_s_per_step"] / step["bf16_s_per_step"], rel=1e-2)
    assert main(["info", "--model", "tiny-64", "--step-time", "1"]) == 2
    assert "not --model" in capsys.readouterr().err


def test_train_then_reconstruct_then_info(tmp_path, photo_folder, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "20", *tiny_args()]) == 0
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


def test_train_minutes_stops_on_time_and_finishes_the_run(tmp_path, photo_folder, capsys):
    """`msdd train --minutes 0.1`: the run stops once 6 s of training have passed, long before --max-steps, and a
    run stopped on time is finished, not interrupted: exit 0, its checkpoint at the last step holds at least that
    training time, and the final model is written. (6 s: more than a first step's one-off costs, so that a budget
    read as seconds, not minutes, stops far too early.) `--resume` on a new run directory is an error (exit 2)."""
    import torch

    from msdd.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    args = tiny_args(f"data.source={photo_folder}", f"data.eval_source={photo_folder}", "train.batch_size=4",
                     "model.linear_path=false")
    assert main(["train", "--run-dir", str(run), "--minutes", "0.1", "--max-steps", "3000", *args]) == 0
    state = torch.load(latest_checkpoint(run) / "state.pt", weights_only=True)
    assert 1 <= state["step"] < 3000 and state["train_seconds"] >= 5.9, (state["step"], state["train_seconds"])
    assert (run / "model" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path / "new"), "--resume", "--max-steps", "1", *args]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err and not (tmp_path / "new" / "model").exists()


def test_reconstruct_bad_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", *tiny_args()]) == 0
    model = str(run / "model")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(small)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["reconstruct", str(small), "--model", model, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "smaller than the model resolution 32" in err and "--keep-size" in err and "Re-save" not in err
    assert main(["reconstruct", str(corrupt), "--model", model, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "Re-save it" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["reconstruct", str(empty), "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "no image" in capsys.readouterr().err.lower()
    assert main(["reconstruct", str(small), "--model", model, "--steps", "a,b"]) == 2
    assert "--steps" in capsys.readouterr().err


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
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "1", *tiny_args(),
                 "--set", f"data.source={tmp_path / 'empty'}"]) == 2
    assert "empty" in capsys.readouterr().err


def test_demo_writes_a_report(tmp_path, capsys, monkeypatch):
    """`msdd demo --minutes`: both stages sized from a measured step time, 70% of the budget to stage 1 and 30% to
    stage 2 (the budget functions run as they are; the test records what they were given); the report's rows."""
    import msdd.demo

    budgets = {}

    def recording(name):
        real = getattr(msdd.demo, name)

        def record(cfg, *args):
            budgets[name] = args[-2]  # (..., minutes, device)
            return real(cfg, *args)
        return record

    for name in ("budgeted_config", "budgeted_distill"):
        monkeypatch.setattr(msdd.demo, name, recording(name))
    out = tmp_path / "demo"
    with pytest.warns(UserWarning, match="train.max_steps=200, .*: not used, the demo sizes its own steps"):
        assert main(["demo", "--minutes", "0.05", "--out", str(out), *tiny_args()]) == 0
    assert budgets == pytest.approx({"budgeted_config": 0.035, "budgeted_distill": 0.015})
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["eval_set"]["images"] == 42
    for key in ("teacher", "student", "bicubic"):
        assert 5 < metrics[key]["psnr"] < 60 and 0 < metrics[key]["ssim"] <= 1
    assert metrics["bicubic"]["floats"] <= metrics["latent"]["floats"]
    assert metrics["student"]["decoder_passes"] == 3 and metrics["teacher"]["decoder_passes"] == 6
    assert metrics["student_vs_teacher"]["pass_ratio"] == 2.0  # the teacher's passes over the student's
    assert metrics["stage1"]["steps"] >= 10 and metrics["stage2"]["steps"] >= 10
    assert (out / "report" / "grid.png").exists()
    assert "bicubic" in (out / "report" / "summary.md").read_text()
    assert "msdd demo" in capsys.readouterr().out
    # run again (as after an interruption): both stages continue from their run directories with their own configs
    # (--minutes is not measured again), nothing more is trained, and the report is the same but for its timings
    budgets.clear()
    with pytest.warns(UserWarning, match="not used, the demo sizes its own steps"):  # tiny_args' step settings
        assert main(["demo", "--minutes", "0.05", "--out", str(out), *tiny_args()]) == 0
    printed = capsys.readouterr().out
    assert f"continuing stage 1 in {out / 'stage1'}" in printed and f"continuing stage 2 in {out / 'stage2'}" in printed
    assert budgets == {}
    again = json.loads((out / "report" / "metrics.json").read_text())
    logged = [json.loads(line) for line in (out / "stage1" / "log.jsonl").read_text().splitlines()]
    assert again["stage1"] == {**metrics["stage1"], "final_loss": logged[-1]["loss"]}  # this call trained no step
    assert again["stage2"] == metrics["stage2"]
    for key in ("teacher", "student"):
        assert {**again[key], "decode_seconds_per_image": 0} == {**metrics[key], "decode_seconds_per_image": 0}


@pytest.mark.slow
def test_the_tiny_64_demo_shows_the_shipped_student_beside_its_own(tmp_path, capsys, monkeypatch):
    """At the shipped model's preset the demo decodes the same images with the pretrained student too: its row in
    metrics.json and summary.md, its column last in the grid, each the decode of the bundled model with the demo's
    seed (a 30-second demo: the fewest steps, a PCA of 1000 crops)."""
    from msdd.data import embedded_eval_set
    from msdd.eval.baselines import pca_baseline, pca_for_source
    from msdd.eval.metrics import bicubic_baseline, psnr_per_image
    from msdd.eval.reconstruct import reconstruct_images
    from msdd.tokenizer import Tokenizer

    from conftest import assert_grid_shows

    monkeypatch.setenv("MSDD_PCA_CROPS", "1000")
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.01", "--out", str(out), "--set", "train.pca_crops=300"]) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    images, names = embedded_eval_set(64)
    shipped, _ = reconstruct_images(Tokenizer.from_pretrained("tiny-64-student"), images, seed=0)
    row = metrics["shipped_student"]
    assert row["model"] == "tiny-64-student" and row["steps_per_stage"] == [1, 1, 1, 1] and row["decoder_passes"] == 4
    assert row["psnr"] == round(psnr_per_image(shipped, images).mean().item(), 3) != metrics["student"]["psnr"]
    summary = (out / "report" / "summary.md").read_text()
    assert f"| shipped tiny-64-student (pretrained), steps [1, 1, 1, 1], cfg 1.0 | 256 | {row['psnr']:.2f} |" in summary
    assert "Grid (real | bicubic | PCA | teacher | student | shipped student)" in capsys.readouterr().out
    own = [reconstruct_images(Tokenizer.from_pretrained(out / f"stage{i}" / "model"), images, seed=0)[0]
           for i in (1, 2)]
    pca = pca_baseline(pca_for_source("embedded", 64, 256), images)
    order = [i for i, n in enumerate(names) if "_" not in n] + [i for i, n in enumerate(names) if "_" in n]
    columns = [images, bicubic_baseline(images, 256), pca, *own, shipped]
    assert_grid_shows(out / "report" / "grid.png", [c[order[:12]] for c in columns], 64)


def test_demo_stops_when_a_stage_is_interrupted(tmp_path):
    """A stage stopped by SIGTERM ends the demo with 128 + 15 instead of going on without its model."""
    from msdd.demo import _stop_if_interrupted

    with pytest.raises(SystemExit) as e:
        _stop_if_interrupted({"interrupted": "SIGTERM"}, tmp_path)
    assert e.value.code == 143
    assert _stop_if_interrupted({"interrupted": None}, tmp_path) == {"interrupted": None}


def test_export_fp16_copy_decodes_like_the_fp32_original(tmp_path, capsys):
    """`msdd export` (fp16 by default): the copy's config says fp16 and names its source, its file holds
    fp16 tensors (half the size), its weights are the original's rounded to fp16, and it encodes and
    decodes held-out photos like the fp32 original (same noise)."""
    import torch
    from safetensors import safe_open

    from msdd.data import embedded_eval_set
    from msdd.eval.metrics import psnr_per_image
    from msdd.hub import file_sha256
    from msdd.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("tiny-64-teacher")  # trained; stored as fp16, so made fp32 below
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3 * p.abs().mean())  # values fp16 cannot hold
    src, out = tmp_path / "fp32", tmp_path / "fp16"
    tok.save_pretrained(src)
    capsys.readouterr()
    assert main(["export", "--model", str(src), "--out", str(out)]) == 0
    assert f"wrote {out} (fp16 weights)" in capsys.readouterr().out

    meta, src_meta = (json.loads((d / "config.json").read_text()) for d in (out, src))
    assert meta["weights_dtype"] == "fp16" and "weights_dtype" not in src_meta
    assert meta["exported_from_sha256"] == file_sha256(src / "model.safetensors")
    assert meta["model"] == src_meta["model"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    ratio = (out / "model.safetensors").stat().st_size / (src / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55

    half = Tokenizer.from_pretrained(out)
    assert half.metadata["weights_dtype"] == "fp16"
    for (name, a), (_, b) in zip(tok.state_dict().items(), half.state_dict().items()):
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float()), name
    assert any(not torch.equal(a, b) for a, b in zip(tok.parameters(), half.parameters()))

    x = embedded_eval_set(64)[0][:4]
    z, z_half = tok.encode(x), half.encode(x)
    assert (z_half - z).abs().max() < 0.01 * z.abs().max()
    fp32, fp16 = tok.decode(z, steps=2, seed=1), half.decode(z, steps=2, seed=1)
    other_noise = tok.decode(z, steps=2, seed=2)
    assert (psnr_per_image(fp16, fp32) > 45).all(), psnr_per_image(fp16, fp32)
    assert (fp16 - fp32).abs().mean() < 0.05 * (other_noise - fp32).abs().mean()


def _hand_latent_stats(tok, folder, n):
    """Per-channel mean and (population) std of the latents of the first n training crops of `folder`, the
    images `msdd latent-stats` reads (seed 0), by hand in float64."""
    import torch

    from msdd.data import build_train_dataset

    ds = build_train_dataset(str(folder), tok.config.image_size, seed=0)
    images = torch.stack([ds[i][0] for i in range(n)])
    with torch.no_grad():
        z = tok.encoder(images).double().flatten(0, 1)  # (n * tokens, channels)
    return z.mean(0), z.std(0, correction=0), z


def test_latent_stats_are_the_mean_and_std_of_the_latents(tmp_path, photo_folder, capsys):
    import torch

    from msdd.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("tiny-64-teacher")
    model = tmp_path / "m"
    tok.save_pretrained(model)  # an fp32 model directory, updated in place
    capsys.readouterr()
    assert main(["latent-stats", "--model", str(model), "--data", str(photo_folder), "--max-images", "6"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    mean, std, z = _hand_latent_stats(tok, photo_folder, 6)
    assert z.shape == (6 * 32, 8) and (std > 1e-3).all()
    torch.testing.assert_close(torch.tensor(printed["mean"], dtype=torch.float64), mean, rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.tensor(printed["std"], dtype=torch.float64), std, rtol=0, atol=2e-5)
    stored = Tokenizer.from_pretrained(model)
    torch.testing.assert_close(stored.latent_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored.latent_std.double(), std, rtol=1e-5, atol=1e-6)
    zn = stored.normalize_latents(z.float())  # the same latents, normalised: zero mean, unit std per channel
    torch.testing.assert_close(zn.mean(0), torch.zeros(8), rtol=0, atol=1e-4)
    torch.testing.assert_close(zn.std(0, correction=0), torch.ones(8), rtol=0, atol=1e-4)


def test_latent_stats_use_at_most_max_images(tmp_path, photo_folder, capsys):
    import torch

    from msdd.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("tiny-64-teacher")
    tok.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["latent-stats", "--model", str(tmp_path / "m"), "--data", str(photo_folder), "--max-images", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    mean, _, _ = _hand_latent_stats(tok, photo_folder, 4)
    torch.testing.assert_close(torch.tensor(printed["mean"], dtype=torch.float64), mean, rtol=0, atol=2e-5)


def test_the_training_commands_hand_every_option_to_what_runs_them(tmp_path, monkeypatch):
    """`msdd train`, `distill`, `gen-train`, `demo` and `fidelity` pass each option on: --limit and --init-from as
    config fields beside --set, the weight files, --resume, --max-steps and --minutes, the fidelity table's folder and
    seeds (each runner replaced by one that keeps its arguments and stops; the real ones run in test_train,
    test_distill, test_generator, test_demo and test_fidelity)."""
    import msdd.demo
    import msdd.eval.fidelity
    import msdd.generator.train
    import msdd.train.distill
    import msdd.train.stage1
    from msdd.config import load_config
    from msdd.generator.config import load_gen_config

    class Seen(Exception):
        pass

    class Runner:
        def __init__(self, *args, **kwargs):
            self.made = (args, kwargs)

        def fit(self, **kwargs):
            raise Seen(*self.made, kwargs)

        def run(self):
            raise Seen(*self.made)

    def kept(argv):
        with pytest.raises(Seen) as seen:
            main(argv)
        return seen.value.args

    monkeypatch.setattr(msdd.train.stage1, "Stage1Trainer", Runner)
    monkeypatch.setattr(msdd.train.distill, "build_distiller", Runner)
    monkeypatch.setattr(msdd.eval.fidelity, "Fidelity", Runner)
    monkeypatch.setattr(msdd.generator.train, "GeneratorTrainer", Runner)
    monkeypatch.setattr(msdd.demo, "run_demo", lambda *args, **kwargs: Runner(*args, **kwargs).run())
    monkeypatch.chdir(tmp_path)
    run = str(tmp_path / "run")
    train = ["train", "--preset", "tiny-64", "--set", "train.lr=0.002", "--run-dir", run]
    args, kwargs, fit = kept([*train, "--resume", "--max-steps", "7", "--minutes", "1.5", "--limit", "9", "--init-from",
                              "tiny-64-teacher", "--vgg-weights", "v.pth", "--dinov2-weights", "d.pth"])
    given = ["train.lr=0.002", "data.limit=9", "train.init_from=tiny-64-teacher"]
    assert args == (load_config("tiny-64", given), run)
    assert kwargs == {"device": "cpu", "require_resume": True, "vgg_weights": "v.pth", "dinov2_weights": "d.pth"}
    assert fit == {"max_steps": 7, "minutes": 1.5}
    assert kept(train) == ((load_config("tiny-64", ["train.lr=0.002"]), run),
                           {"device": "cpu", "require_resume": False, "vgg_weights": None, "dinov2_weights": None},
                           {"max_steps": None, "minutes": None})
    distill = ["distill", "--teacher", "tiny-64-teacher", "--set", "distill.lr=0.003", "--run-dir", run]
    args, kwargs, fit = kept([*distill, "--resume", "--max-steps", "5", "--minutes", "2.5", "--limit", "8",
                              "--vgg-weights", "v.pth", "--dino-weights", "o.pth"])
    assert args == (load_config("tiny-64", ["distill.lr=0.003", "data.limit=8"]), "tiny-64-teacher", run)
    assert kwargs == {"device": "cpu", "vgg_weights": "v.pth", "dino_weights": "o.pth", "require_resume": True}
    assert fit == {"max_steps": 5, "minutes": 2.5}
    assert not (tmp_path / "run").exists()
    gen = ["gen-train", "--tokenizer", "tiny-64-teacher", "--run-dir", run, "--preset", "gen-xl", "--set", "depth=3"]
    assert kept([*gen, "--resume", "--max-steps", "6", "--minutes", "0.5"]) == (
        (load_gen_config("gen-xl", ["depth=3"]), "tiny-64-teacher", run), {"device": "cpu", "require_resume": True},
        {"max_steps": 6, "minutes": 0.5})
    assert kept(gen)[1:] == ({"device": "cpu", "require_resume": False}, {"max_steps": None, "minutes": None})
    assert kept(["demo", "--minutes", "3", "--preset", "tiny-test", "--set", "train.lr=0.004", "--out", "d"]) == (
        ("d",), {"minutes": 3.0, "preset": "tiny-test", "overrides": ("train.lr=0.004",), "device": "cpu"})
    fidelity = {"preset": "tiny-64", "overrides": (), "seeds": 2, "total_steps": 40, "quick": False, "device": "cpu",
                "ssdd_overrides": (), "train_steps": None, "distill_steps": None}
    assert kept(["fidelity"]) == (("benchmarks/fidelity/latest", 120.0), fidelity)
    assert kept(["fidelity", "--quick"]) == (("msdd-fidelity-quick", 120.0), {**fidelity, "quick": True})
    assert kept(["fidelity", "--out", "f", "--minutes", "9", "--set", "a=1", "--seeds", "3", "--total-steps", "12",
                 "--ssdd-set", "b=2", "--train-steps", "4", "--distill-steps", "6"]) == (
        ("f", 9.0), {**fidelity, "overrides": ("a=1",), "seeds": 3, "total_steps": 12, "ssdd_overrides": ("b=2",),
                     "train_steps": 4, "distill_steps": 6})
