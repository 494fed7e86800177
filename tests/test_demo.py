"""`msdd demo`'s pieces on tiny inputs (the demo itself trains for minutes; tests/test_cli.py runs it once):
the quality rows of its report, the config it accepts, and the summary it prints."""

import warnings

import pytest
import torch

from msdd.demo import _demo_config, quality, render_summary
from msdd.eval.metrics import psnr_per_image, ssim_per_image


def test_quality_whole_photos_leave_out_the_tiles():
    """`psnr_whole_photos` / `ssim_whole_photos` average the whole held-out photos only (names without "_"),
    not their tiles ("chelsea_2x2_0"); `psnr` / `ssim` average every image; per_image keeps each name's pair."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.tensor([0.02, 0.3, 0.05, 0.4]).view(4, 1, 1, 1)  # the tiles far worse than the whole photos
    recon = (images + noise * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    names = ["chelsea", "chelsea_2x2_0", "rocket", "rocket_3x3_4"]
    q = quality(recon, images, names)
    psnr, ssim = psnr_per_image(recon, images), ssim_per_image(recon, images)
    assert q["psnr"] == pytest.approx(psnr.mean().item(), abs=1e-3)
    assert q["psnr_whole_photos"] == pytest.approx(psnr[[0, 2]].mean().item(), abs=1e-3)
    assert q["ssim_whole_photos"] == pytest.approx(ssim[[0, 2]].mean().item(), abs=1e-4)
    assert q["psnr_whole_photos"] > q["psnr"] + 3
    assert list(q["per_image"]) == names and q["per_image"]["rocket"][0] == pytest.approx(psnr[2].item(), abs=1e-3)


@pytest.mark.parametrize("key", ["train.max_steps", "train.ckpt_every", "distill.max_steps", "distill.grid_every"])
def test_demo_config_names_the_step_overrides_it_ignores(key):
    """The demo sizes both stages' steps, checkpoints and grids itself: an override of any of them, for stage 1
    (train) or stage 2 (distill), is named as unused; other overrides apply without a warning."""
    with pytest.warns(UserWarning, match=f"--set {key}=7: not used, the demo sizes its own steps"):
        _demo_config("tiny-test", [f"{key}=7"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _demo_config("tiny-test", ["train.lr=0.002", "distill.batch_size=3"])
    assert cfg.train.lr == 0.002 and cfg.distill.batch_size == 3


def _row(psnr: float) -> dict:
    return {"steps_per_stage": [2, 2], "cfg": 1.0, "psnr": psnr, "ssim": 0.5, "psnr_whole_photos": psnr,
            "decoder_passes": 4, "decode_seconds_per_image": 0.01}


def test_summary_says_which_side_of_each_baseline_the_models_are():
    """The summary's closing sentences: the teacher (22 dB) is above bicubic (20 dB) and below PCA (25 dB), by
    the right margins; the student (19 dB) is below both; with its measured passes ratio and speed-up."""
    r = {"preset": "tiny-test", "device": "cpu", "machine": "x86_64, 2 threads",
         "stage1": {"steps": 10, "seconds": 5.0, "batch_size": 4},
         "stage2": {"steps": 5, "seconds": 3.0, "batch_size": 4, "discriminator": "none", "perceptual": "none",
                    "lambda_pix": 1.0},
         "eval_set": {"images": 42, "source": "held-out photos", "resolution": 32},
         "latent": {"tokens": 4, "channels": 2, "floats": 8},
         "teacher": _row(22.0), "student": _row(19.0),
         "student_vs_teacher": {"psnr_diff_db": -3.0, "pass_ratio": 2.0, "speedup": 1.5},
         "bicubic": {"side": 2, "floats": 12, "psnr": 20.0, "ssim": 0.4, "psnr_whole_photos": 20.0},
         "pca": {"components": 8, "floats": 8, "fitted_on": "300 crops", "psnr": 25.0, "ssim": 0.6,
                 "psnr_whole_photos": 25.0}}
    text = render_summary(r, 120.0)
    for line in ("The teacher is 2.00 dB above the bicubic baseline", "The teacher is 3.00 dB below the PCA baseline",
                 "The student is 1.00 dB below the bicubic baseline", "The student is 6.00 dB below the PCA baseline",
                 "Student vs teacher: -3.00 dB PSNR with 2x fewer decoder passes, 1.5x faster decode",
                 "Whole demo: 2.0 min."):
        assert line in text, line
