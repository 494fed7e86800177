"""Evaluation: metric sanity against reference implementations, protocol, offline behaviour, torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from torchmetrics.functional.image import structural_similarity_index_measure

from msdd.cli import main
from msdd.eval.evaluate import evaluate
from msdd.eval.metrics import bicubic_baseline, bicubic_side, psnr_per_image, ssim_per_image
from msdd.eval.plots import plot_pareto
from msdd.tokenizer import Tokenizer

from conftest import tiny_config


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(2, 3, 48, 48, generator=g)).clamp(-1, 1)
    return a, b


def test_psnr_identical_is_inf(pair):
    a, _ = pair
    assert torch.isinf(psnr_per_image(a, a)).all()


def test_psnr_ssim_match_skimage(pair):
    a, b = pair
    for i in range(2):
        x = ((a[i] + 1) / 2).permute(1, 2, 0).numpy().astype(np.float64)
        y = ((b[i] + 1) / 2).permute(1, 2, 0).numpy().astype(np.float64)
        assert psnr_per_image(b, a)[i].item() == pytest.approx(sk_psnr(x, y, data_range=1.0), abs=1e-3)
        ref = sk_ssim(x, y, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                      use_sample_covariance=False)
        assert ssim_per_image(b, a)[i].item() == pytest.approx(ref, abs=2e-3)


def test_ssim_uses_data_range_one_not_two():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 48, 48, generator=g) * 0.5 - 0.25  # low-contrast images, noisy reconstructions
    b = (a + 0.3 * torch.randn(2, 3, 48, 48, generator=g)).clamp(-1, 1)
    ours = ssim_per_image(b, a).mean().item()
    unit = lambda x: (x + 1) / 2  # noqa: E731
    assert ours == pytest.approx(structural_similarity_index_measure(unit(b), unit(a), data_range=1.0).item(), abs=1e-6)
    # the reference code's mistake: [0, 1] images with data_range 2 -> larger constants -> inflated SSIM
    inflated = structural_similarity_index_measure(unit(b), unit(a), data_range=2.0).item()
    assert inflated > ours + 0.02


def test_fid_with_a_custom_feature_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class TinyFeatures(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            torch.nn.init.normal_(self.conv.weight, std=0.1)

        def forward(self, x):
            return self.conv(x.float() / 255).mean(dim=(2, 3))

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 200, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    fid = FrechetInceptionDistance(feature=TinyFeatures())
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = fid.compute().item()
    fid.reset()
    fid.update(real, real=True)
    fid.update((real.int() + 50).clamp(0, 255).to(torch.uint8), real=False)
    shifted = fid.compute().item()
    assert abs(same) < 1e-3
    assert shifted > 100 * max(abs(same), 1e-6) and shifted > 1e-3


def test_bicubic_baseline_budget():
    assert bicubic_side(256) == 9 and 3 * 9 * 9 <= 256
    assert bicubic_side(128 * 32) == 36
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert bicubic_baseline(x, 256).shape == x.shape


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = Tokenizer(tiny_config().model)
    torch.nn.init.normal_(tok.decoder.final.linear.weight, std=0.05)
    path = tmp_path_factory.mktemp("m") / "model"
    tok.save_pretrained(path)
    return path


def test_evaluate_protocol_and_offline_skips(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    tok = Tokenizer.from_pretrained(model_dir)
    r = evaluate(tok, "embedded", limit=6, batch_size=4, model_path=model_dir)
    p = r["protocol"]
    assert p["images"] == 6 and p["steps_per_stage"] == [2, 2, 2] and p["dtype"] == "fp32"
    assert len(p["checkpoint_sha256"]) == 64 and "centre crop" in p["crop"]
    assert set(r["skipped_metrics"]) == {"lpips", "rfid"}
    assert "vgg16-397923af.pth" in r["skipped_metrics"]["lpips"] and "--vgg-weights" in r["skipped_metrics"]["lpips"]
    assert "weights-inception" in r["skipped_metrics"]["rfid"] and "--inception-weights" in r["skipped_metrics"]["rfid"]
    r2 = evaluate(tok, "embedded", limit=6, batch_size=6)
    assert r2["metrics"]["psnr"] == pytest.approx(r["metrics"]["psnr"], abs=1e-4)  # batch size does not matter


def test_explicit_missing_weights_path_is_an_error(model_dir, tmp_path):
    tok = Tokenizer.from_pretrained(model_dir)
    r = evaluate(tok, "embedded", limit=2, inception_weights=tmp_path / "nope.pth")
    assert "no such file" in r["skipped_metrics"]["rfid"]


def test_eval_cli_writes_json_and_plot(model_dir, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(model_dir), "--limit", "4", "--sweep-steps", "1;2", "--out", str(out),
                 "--plot", str(tmp_path / "p.png")]) == 0
    results = json.loads(out.read_text())
    assert [r["protocol"]["steps_per_stage"] for r in results] == [[1, 1, 1], [2, 2, 2]]
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_pareto_plot_with_rfid(tmp_path):
    pts = [{"label": "a", "img_per_s": 1.0, "psnr": 20.0, "rfid": 3.0},
           {"label": "b", "img_per_s": 30.0, "psnr": 19.0, "rfid": 4.0}]
    assert plot_pareto(pts, tmp_path / "x.png").exists()


def test_torchrun_two_processes_match_one(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    base = ["-m", "msdd.cli", "eval", "--model", str(model_dir), "--limit", "7", "--batch-size", "3"]
    subprocess.run([sys.executable, *base, "--out", str(one)], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    *base, "--out", str(two)], check=True, env=env, capture_output=True)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["protocol"]["processes"] == 2 and b["protocol"]["images"] == a["protocol"]["images"] == 7
    assert b["metrics"]["psnr"] == pytest.approx(a["metrics"]["psnr"], abs=1e-4)
    assert b["metrics"]["ssim"] == pytest.approx(a["metrics"]["ssim"], abs=1e-5)


def test_lpips_matches_torchmetrics_given_the_same_vgg16_file(model_dir, tmp_path, monkeypatch):
    """Our differentiable LPIPS (msdd.models.perceptual) against torchmetrics' reference implementation,
    both reading one VGG16 file: a stand-in with random weights (the real one is 528 MB and online), put
    where torchvision's cache looks for it, so torchmetrics loads it without a download."""
    import torchvision
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity as tm_lpips

    from msdd.models.perceptual import LPIPS

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), cache / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # torchvision reads the cache first and downloads only a missing file: make sure it looks here
    assert (Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth").is_file()

    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
    ours = LPIPS(cache / "vgg16-397923af.pth")
    ref = torch.stack([tm_lpips(x[i : i + 1], y[i : i + 1], net_type="vgg") for i in range(3)])
    torch.testing.assert_close(ours(x, y), ref, rtol=1e-4, atol=1e-6)
    assert ours(x, x).abs().max() < 1e-6 and (ours(x, y) > 0).all()

    r = evaluate(Tokenizer.from_pretrained(model_dir), "embedded", limit=2)  # found in the cache
    assert "lpips" not in r["skipped_metrics"] and r["metrics"]["lpips"] > 0
