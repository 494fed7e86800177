"""Evaluation: metric sanity against reference implementations, protocol, offline behaviour, torchrun."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from msdd.cli import main
from msdd.data import embedded_eval_set
from msdd.eval.evaluate import evaluate
from msdd.eval.metrics import bicubic_baseline, bicubic_side, psnr_per_image, quantize, ssim_per_image
from msdd.eval.plots import plot_pareto
from msdd.eval.reconstruct import reconstruct_images
from msdd.tokenizer import Tokenizer

from conftest import random_vgg16_file, tiny_config


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


def test_ssim_is_its_stated_convention(pair):
    """SSIM_CONVENTION by hand: Gaussian-weighted statistics on reflection-padded images, the map averaged over every
    pixel; inside the border it is skimage's map, whose mean over the windows inside the image differs."""
    a, b = (((t + 1) / 2).double() for t in pair)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    kernel = (g / g.sum()).outer(g / g.sum()).expand(3, 1, 11, 11)
    blur = lambda t: F.conv2d(F.pad(t, (5, 5, 5, 5), mode="reflect"), kernel, groups=3)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    hand = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    assert torch.allclose(ssim_per_image(*reversed(pair)).double(), hand.flatten(1).mean(1), atol=1e-5)
    for i in range(2):
        x, y = (t[i].permute(1, 2, 0).numpy() for t in (a, b))
        valid = sk_ssim(y, x, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                        use_sample_covariance=False)
        assert hand[i, :, 5:-5, 5:-5].mean().item() == pytest.approx(valid, abs=1e-6)


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


class RecordingFeatures(torch.nn.Module):
    """A small fixed feature extractor for FrechetInceptionDistance that keeps every batch it is given."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        torch.nn.init.normal_(self.conv.weight, std=0.3, generator=torch.Generator().manual_seed(0))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        h = torch.tanh(self.conv(x.float() / 127.5 - 1))
        return h.mean(dim=(2, 3)) + h.pow(2).mean(dim=(2, 3))  # (B, 4)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to feature rows a and b (unbiased covariances)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_rfid_compares_the_uint8_crops_with_the_reconstructions(model_dir, monkeypatch):
    """msdd's use of torchmetrics' FID: `evaluate` feeds the metric the centre-cropped originals as real
    and the rounded reconstructions (the ones PSNR is computed on) as fake, uint8 in [0, 255], every batch
    of the run, and reports Frechet distance of the features of all of them (checked by hand)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    import msdd.eval.evaluate as ev

    features, made = RecordingFeatures(), []

    def fake_build_fid(weights, device):
        made.append(weights)
        return FrechetInceptionDistance(feature=features, reset_real_features=True), None

    monkeypatch.setattr(ev, "build_fid", fake_build_fid)
    tok = Tokenizer.from_pretrained(model_dir)
    with pytest.warns(UserWarning, match="rFID on 10 images is not comparable"):
        r = evaluate(tok, "embedded", limit=10, batch_size=4, inception_weights="w.pth", pca_source=None)
    assert made == ["w.pth"] and "rfid" not in r["skipped_metrics"] and "Inception" in r["protocol"]["rfid"]

    seen = features.seen  # torchmetrics calls the extractor once per update: real, fake, real, fake, ...
    assert len(seen) == 2 * 3 and [len(x) for x in seen[::2]] == [4, 4, 2]
    real, fake = torch.cat(seen[0::2]), torch.cat(seen[1::2])
    assert real.dtype == fake.dtype == torch.uint8
    crops = embedded_eval_set(32)[0][:10]  # the protocol's centre crops, in order
    assert torch.equal(real, ((crops + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    # the fake images are the reconstructions the reported PSNR is computed on
    to_unit = lambda u8: u8.double() / 127.5 - 1  # noqa: E731
    assert psnr_per_image(to_unit(fake), to_unit(real)).mean().item() == pytest.approx(r["metrics"]["psnr"], abs=1e-3)
    assert not torch.equal(real, fake)

    with torch.no_grad():
        f_real, f_fake = features.forward(real).double().numpy(), features.forward(fake).double().numpy()
    assert r["metrics"]["rfid"] == pytest.approx(_frechet(f_real, f_fake), rel=1e-3, abs=1e-6)
    assert r["metrics"]["rfid"] > 1e-4  # the reconstructions differ from the crops
    one = evaluate(tok, "embedded", limit=1, inception_weights="w.pth", pca_source=None)
    assert "rfid" not in one["metrics"] and "at least 2 images" in one["skipped_metrics"]["rfid"]
    with pytest.warns(UserWarning, match="rFID on 2 images"):  # the fewest it is computed on
        two = evaluate(tok, "embedded", limit=2, inception_weights="w.pth", pca_source=None)
    assert two["metrics"]["rfid"] > 0 and "rfid" not in two["skipped_metrics"]


def test_generate_metrics_fid_feeds_every_data_image_as_real_and_every_sample_as_fake(monkeypatch):
    """`msdd generate --metrics`' FID (`fid_against`) through torchmetrics' FID with a small recording feature
    extractor: all 70 data images as real and all 67 samples as fake (more than one batch of each), uint8, and the
    Frechet distance of their features (checked by hand)."""
    import msdd.eval.evaluate as ev
    from msdd.generator.quality import fid_against
    from torchmetrics.image.fid import FrechetInceptionDistance

    features = RecordingFeatures()
    monkeypatch.setattr(ev, "build_fid", lambda weights, device: (
        FrechetInceptionDistance(feature=features, reset_real_features=True), None))
    g = torch.Generator().manual_seed(0)
    data, samples = torch.rand(70, 3, 16, 16, generator=g) * 2 - 1, torch.rand(67, 3, 16, 16, generator=g) * 1.6 - 0.8
    fid = fid_against(samples, data)
    to_u8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    assert torch.equal(torch.cat(features.seen), torch.cat([to_u8(data), to_u8(samples)]))  # real, then fake
    with torch.no_grad():
        f_real, f_fake = (features.forward(to_u8(x)).double().numpy() for x in (data, samples))
    assert fid == pytest.approx(_frechet(f_real, f_fake), rel=1e-3, abs=1e-6) and fid > 1e-3


def test_build_fid_refuses_pickles_and_names_what_is_missing(tmp_path, monkeypatch):
    import argparse

    from msdd.eval.evaluate import build_fid

    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"net": argparse.Namespace(a=1)}, path)  # not a plain tensor state dict: torch-fidelity would
    with pytest.raises(ValueError, match="not a plain tensor state dict"):  # unpickle (run) whatever it holds
        build_fid(path, "cpu")
    fid, reason = build_fid(tmp_path / "nope.pth", "cpu")
    assert fid is None and "no such file" in reason and "--inception-weights" in reason
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # `import torch_fidelity` now fails
    fid, reason = build_fid(path, "cpu")
    assert fid is None and "pip install 'msdd[fid]'" in reason


def test_bicubic_baseline_budget():
    assert bicubic_side(256) == 9 and 3 * 9 * 9 <= 256
    assert bicubic_side(128 * 32) == 36
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert bicubic_baseline(x, 256).shape == x.shape
    wide = torch.rand(2, 3, 48, 80) * 2 - 1  # any size: the same 9 x 9 code, back at the images' size
    assert bicubic_baseline(wide, 256).shape == wide.shape
    flat = torch.full((1, 3, 40, 72), 0.2)
    torch.testing.assert_close(bicubic_baseline(flat, 256), quantize(flat), atol=1e-6, rtol=0)


def test_the_bicubic_baseline_of_the_embedded_held_out_set_is_the_one_reported():
    """The baseline every report prints beside the model (README, model card: 26.06 dB / SSIM 0.682 on the 42
    held-out images at 256 floats): antialiased bicubic down to 9 x 9, bicubic up with align_corners=False."""
    images, _ = embedded_eval_set(64)
    bic = bicubic_baseline(images, 256)
    assert psnr_per_image(bic, images).mean().item() == pytest.approx(26.06, abs=0.005)
    assert ssim_per_image(bic, images).mean().item() == pytest.approx(0.682, abs=0.0005)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model whose reconstructions depend on their images: every weight random (a fresh encoder's zero
    output layer gives every image the latent 0, and a fresh decoder's zero gates leave only the noise to reach its
    output: a reconstruction scored against another image's crop would pass)."""
    tok = Tokenizer(tiny_config().model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(std=0.02, generator=g)
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
    assert "lpips" not in p and "rfid" not in p  # the protocol describes the metrics that ran
    assert "vgg16-397923af.pth" in r["skipped_metrics"]["lpips"] and "--vgg-weights" in r["skipped_metrics"]["lpips"]
    assert "weights-inception" in r["skipped_metrics"]["rfid"] and "--inception-weights" in r["skipped_metrics"]["rfid"]
    r2 = evaluate(tok, "embedded", limit=6, batch_size=6)
    assert r2["metrics"]["psnr"] == pytest.approx(r["metrics"]["psnr"], abs=1e-4)  # batch size does not matter
    # each image's reconstruction, from its own latent and the noise of its index, scored against its own crop
    crops = quantize(embedded_eval_set(32)[0][:6])
    rec, _ = reconstruct_images(tok, crops, seed=0)
    assert psnr_per_image(rec, crops).mean().item() == pytest.approx(r["metrics"]["psnr"], abs=1e-4)
    assert ssim_per_image(rec, crops).mean().item() == pytest.approx(r["metrics"]["ssim"], abs=1e-5)


def test_evaluate_reports_what_it_scored_skipped_and_decoded(model_dir, photo_folder):
    """The report's counts on a folder: the unreadable file skipped, the decoder passes per image of the decode
    asked for (guided: two per step), the bicubic baseline's own float count (3 s^2, within the latent's 32)."""
    (photo_folder / "broken.png").write_bytes(b"not a png")
    tok = Tokenizer.from_pretrained(model_dir)
    with pytest.warns(UserWarning, match="skipping .*broken.png"):
        r = evaluate(tok, str(photo_folder), steps=[1, 2, 1], guidance=2.0, pca_source=None)
    p = r["protocol"]
    assert p["images"] == 6 and p["skipped_files"] == 1
    assert p["steps_per_stage"] == [1, 2, 1] and p["cfg"] == 2.0 and p["decoder_passes_per_image"] == 2 * 4
    assert r["baselines"]["bicubic"]["floats"] == 3 * 3 * 3 and "3x3" in r["baselines"]["bicubic"]["method"]


def test_a_folder_is_scored_on_the_centre_crops_of_its_files(photo_folder):
    """The protocol's reference for a folder: each file's ADM centre crop (resize the shorter side, crop the centre),
    with no random crop or flip, the same at every call (a training dataset's crops move with the epoch)."""
    from msdd.data.images import center_crop_arr, to_tensor
    from msdd.eval.evaluate import eval_images

    data = eval_images(str(photo_folder), 32)
    assert len(data) == 6
    for i in range(len(data)):
        x, name, reason = data[i]
        arr = np.asarray(Image.open(name).convert("RGB"))
        assert reason is None and arr.shape == (96, 96, 3)
        assert torch.equal(x, to_tensor(center_crop_arr(arr, 32))) and torch.equal(data[i][0], x)


def test_decode_time_leaves_out_the_first_batch_unless_it_is_the_only_one(model_dir, monkeypatch):
    """decode_seconds_per_image: the mean over the images of the batches after the first (which builds kernels and
    warms caches), from a clock that makes each batch's decode last a set time: 10 s, then 1 s, then 1 s."""
    import types

    import msdd.eval.evaluate as ev

    tok = Tokenizer.from_pretrained(model_dir)
    clock = iter([0.0, 10.0, 10.0, 11.0, 11.0, 12.0])
    monkeypatch.setattr(ev, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    r = evaluate(tok, "embedded", limit=10, batch_size=4, pca_source=None)  # batches of 4, 4, 2 images
    assert r["decode_seconds_per_image"] == pytest.approx((1 + 1) / (4 + 2))  # 1 s for 4 images, 1 s for 2
    assert r["img_per_s"] == pytest.approx(3.0)
    clock = iter([0.0, 10.0])
    r = evaluate(tok, "embedded", limit=4, batch_size=4, pca_source=None)
    assert r["decode_seconds_per_image"] == pytest.approx(10 / 4)


def test_pca_fits_are_cached_per_seed():
    """The PCA baseline's cached fit is keyed by everything it depends on: another seed (other training crops) is
    another fit, not the cached one; the same arguments load the same fit."""
    from msdd.eval.baselines import pca_for_source

    a, b = (pca_for_source("embedded", 32, 8, crops=64, seed=seed) for seed in (0, 1))
    assert not torch.allclose(a.mean, b.mean)
    again = pca_for_source("embedded", 32, 8, crops=64, seed=1)
    assert torch.equal(again.mean, b.mean) and torch.equal(again.components, b.components)


def test_pca_fits_are_keyed_by_resolution_and_size_and_its_reconstructions_are_8_bit(tmp_path, monkeypatch):
    """The cached fit's key holds the resolution, the number of components, of crops and the seed (a 16 px fit is not a
    32 px one); `cache=False` neither reads nor writes the cache. The baseline's reconstructions are rounded to the
    8-bit grid, as every reconstruction a report scores."""
    import msdd.eval.baselines as baselines

    monkeypatch.setenv("MSDD_CACHE", str(tmp_path))
    fits, fit = [], baselines.fit_pca
    monkeypatch.setattr(baselines, "fit_pca", lambda *args: fits.append(args[1]) or fit(*args))
    pca = baselines.pca_for_source("embedded", 32, 8, crops=64)
    assert baselines.pca_for_source("embedded", 16, 8, crops=64).components.shape == (8, 3 * 16 * 16)
    assert baselines.pca_for_source("embedded", 32, 4, crops=64).components.shape == (4, 3 * 32 * 32)
    assert fits == [8, 8, 4] and len(list(tmp_path.glob("pca-*.safetensors"))) == 3
    assert torch.equal(baselines.pca_for_source("embedded", 32, 8, crops=64).components, pca.components)
    baselines.pca_for_source("embedded", 32, 8, crops=64, cache=False)  # a cached fit: not read
    baselines.pca_for_source("embedded", 32, 8, crops=64, seed=5, cache=False)  # a new one: not written
    assert fits == [8, 8, 4, 8, 8] and len(list(tmp_path.iterdir())) == 3
    # and the number of crops and the seed (a quick fit of a few crops is not the 20,000-crop one reports name)
    baselines.pca_for_source("embedded", 32, 8, crops=32)
    baselines.pca_for_source("embedded", 32, 8, crops=64, seed=5)
    assert fits == [8, 8, 4, 8, 8, 8, 8] and len(list(tmp_path.glob("pca-*.safetensors"))) == 5
    images = embedded_eval_set(32)[0][:4]
    rec = baselines.pca_baseline(pca, images)
    assert rec.shape == images.shape and torch.equal(rec, quantize(rec))
    assert not torch.equal(rec, images)


def test_pca_training_crops_pass_over_a_small_folder_again_with_new_crops(photo_folder):
    """`training_crops` returns exactly n crops, drawn by the training pipeline: a folder of fewer images than n is
    passed over again with other random crops (six photographs, 15 crops: 6 + 6 + 3, in batches of 4), every crop
    different; the same seed draws the same crops, another seed other crops."""
    from msdd.eval.baselines import training_crops

    crops = training_crops(str(photo_folder), 32, 15, seed=0, batch_size=4)
    assert crops.shape == (15, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    flat = crops.flatten(1)
    assert (torch.cdist(flat, flat) + torch.eye(15)).min() > 0.1  # 15 distinct crops
    assert torch.equal(crops, training_crops(str(photo_folder), 32, 15, seed=0, batch_size=4))
    other = training_crops(str(photo_folder), 32, 15, seed=1, batch_size=4).flatten(1)
    assert torch.cdist(other, flat).min() > 0.1  # other crops, not these in another order
    assert training_crops("embedded", 32, 5, seed=0).shape == (5, 3, 32, 32)


def test_reconstruct_images_draws_each_images_noise_from_its_key(monkeypatch):
    """`reconstruct_images`: an image's noise comes from its key (default: its index), not from its place in a
    batch, so batches of 2 give the images of a batch of 4 (up to the float rounding of another batch: one level of
    255) and image 3 alone with key 3 its own; other keys, other noise. The time returned is per image (from a clock
    that makes every batch's decode last 1 s)."""
    import types

    import msdd.eval.reconstruct as rec
    from msdd.data import embedded_eval_set

    tok = Tokenizer.from_pretrained("tiny-64-student")
    x = embedded_eval_set(64)[0][:4]
    full, _ = reconstruct_images(tok, x, batch_size=4)
    clock = iter([0.0, 1.0, 1.0, 2.0, 5.0, 6.0])
    monkeypatch.setattr(rec, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    pairs, seconds = reconstruct_images(tok, x, batch_size=2)
    assert seconds == pytest.approx(2.0 / 4)
    assert reconstruct_images(tok, x[:1])[1] == pytest.approx(1.0)  # one image: its batch's second
    monkeypatch.undo()
    assert (pairs - full).abs().max() <= 1 / 127.5 + 1e-6
    alone, _ = reconstruct_images(tok, x[3:], keys=[3])
    assert (alone[0] - full[3]).abs().max() <= 1 / 127.5 + 1e-6
    other, _ = reconstruct_images(tok, x, keys=["a", "b", "c", "d"])
    assert ((other - full).flatten(1).abs().max(1).values > 4 / 127.5).all()


def test_reconstruct_images_in_int8_encodes_in_int8_too():
    """`reconstruct_images(int8=True)` (`msdd reconstruct --int8`): int8 matmuls in the encoder as in the decoder,
    what `Tokenizer.reconstruct(int8=True)` does; the encoder's int8 latents differ from its float32 ones."""
    from msdd.data import embedded_eval_set
    from msdd.eval.reconstruct import reconstruct_images
    from msdd.models.precision import int8_engine
    from msdd.seeding import image_generators

    if int8_engine() is None:
        pytest.skip("this PyTorch build has no quantised CPU kernels")
    tok = Tokenizer.from_pretrained("tiny-64-student")
    x = embedded_eval_set(64)[0][:2]
    assert not torch.equal(tok.encode(x, int8=True), tok.encode(x))
    ours, _ = reconstruct_images(tok, x, int8=True)
    assert torch.equal(ours, quantize(tok.reconstruct(x, int8=True, generator=image_generators(0, [0, 1]))))
    plain = quantize(tok.reconstruct(x, generator=image_generators(0, [0, 1])))  # the default: float32
    assert torch.equal(reconstruct_images(tok, x)[0], plain) and not torch.equal(ours, plain)


def test_stage_fidelity_coarse_psnr_is_at_the_first_stages_resolution():
    """`stage_fidelity`'s coarse_psnr: every stage's estimate and the image averaged down to the first stage's 8 px;
    for the last stage (no noise left) that is the decode's PSNR at 8 px, above its full-resolution PSNR."""
    from msdd.data import embedded_eval_set
    from msdd.eval.stages import stage_fidelity
    from msdd.flow.path import downsample

    tok = Tokenizer.from_pretrained("tiny-64-teacher")
    x = embedded_eval_set(64)[0][:4]
    rows = stage_fidelity(tok, x, steps=1, seed=3)
    decoded = tok.decode(tok.encode(x), steps=1, seed=3)
    coarse = psnr_per_image(downsample(decoded, 3), downsample(x, 3)).mean().item()  # 64 -> 8 px
    assert rows[-1]["coarse_psnr"] == pytest.approx(coarse, abs=1e-4) and coarse > rows[-1]["psnr"] + 1


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


def test_eval_cli_compares_models_in_one_run_and_prints_each(tmp_path, monkeypatch, capsys):
    """`msdd eval --compare`: one result per model, in order, each labelled with its kind, schedule and guidance and
    naming its model folder; a line per model with its metrics, baselines and skipped metrics; the plot given every
    model's point and the first model's baselines (plot_pareto replaced by one that keeps its arguments)."""
    import msdd.eval.plots
    from msdd.hub import resolve_model_dir

    drawn = {}

    def plot(points, path, **kw):
        drawn.update(points=points, **kw)
        return path

    monkeypatch.setattr(msdd.eval.plots, "plot_pareto", plot)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", "tiny-64", "--compare", "tiny-64-teacher", "--limit", "2", "--pca-source", "none",
                 "--cfg", "1.5", "--out", str(out), "--plot", str(tmp_path / "p.png"),
                 "--vgg-weights", str(random_vgg16_file(tmp_path / "vgg16.pth"))]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [r["label"] for r in results] == ["student [1, 1, 1, 1] cfg 1.5", "teacher [10, 10, 10, 10] cfg 1.5"]
    assert [r["model"] for r in results] == [str(resolve_model_dir(n)) for n in ("tiny-64", "tiny-64-teacher")]
    assert results[0]["metrics"]["psnr"] != results[1]["metrics"]["psnr"]
    lines = []
    for r in results:
        m, b = r["metrics"], r["baselines"]["bicubic"]
        lines.append(f"{r['label']}: 2 images, PSNR {m['psnr']:.3f} dB, SSIM {m['ssim']:.4f}, lpips {m['lpips']:.4f}, "
                     f"decode {r['img_per_s']:.2f} img/s\n  baseline {b['method']} ({b['floats']} floats): PSNR "
                     f"{b['psnr']:.3f} dB, SSIM {b['ssim']:.4f}\n")
        lines += [f"  skipped {k}: {why}\n" for k, why in r["skipped_metrics"].items()]
    assert printed == "".join(lines) + f"results -> {out}\nplot -> {tmp_path / 'p.png'}\n"
    assert "skipped rfid: " in printed and "skipped lpips" not in printed
    assert drawn["points"] == [{"label": r["label"], "img_per_s": r["img_per_s"], "psnr": r["metrics"]["psnr"],
                                "rfid": None} for r in results]
    b = results[0]["baselines"]["bicubic"]
    assert drawn["baselines"] == {f"bicubic ({b['floats']} floats)": b["psnr"]}
    assert drawn["title"] == "embedded, cpu, fp32"


def test_eval_warns_when_the_pca_baseline_is_fitted_on_the_scored_images(tmp_path, monkeypatch, capsys):
    """--pca-source naming the --data folder (however the path is written) flatters the PCA baseline: a warning
    before anything is decoded (here the unknown --model stops the run next)."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e.json")]
    with pytest.warns(UserWarning, match=r"--pca-source .*photos is the --data folder: the PCA baseline is fitted on"):
        assert main([*argv, "--data", "photos", "--pca-source", str(tmp_path / "photos")]) == 2
    for other in (["--data", "photos"], []):  # PCA fitted on the embedded training photos (default), scored on others
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert main([*argv, *other, "--pca-source", "embedded"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_eval_cli_int8(model_dir, tmp_path, capsys):
    from msdd.models.precision import msdd_int8

    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(model_dir), "--limit", "2", "--int8", "--pca-source", "none",
                 "--out", str(out)]) == 0
    int8 = json.loads(out.read_text())  # one run: one result
    assert int8["protocol"]["dtype"] == "fp32, decoder matmuls int8" and int8["metrics"]["psnr"] > 0
    if msdd_int8():  # msdd's int8 kernel takes bf16 activations
        assert main(["eval", "--model", str(model_dir), "--limit", "2", "--int8", "--bf16", "--pca-source", "none",
                     "--out", str(out)]) == 0
        assert json.loads(out.read_text())["protocol"]["dtype"] == "bf16, decoder matmuls int8"
    else:  # torch.ao's int8 layers run in float32
        assert main(["eval", "--model", str(model_dir), "--limit", "2", "--int8", "--bf16", "--out", str(out)]) == 2
        assert "int8" in capsys.readouterr().err


def test_pareto_plot_draws_the_points_and_their_front(tmp_path, monkeypatch):
    """The figure's content: one panel per metric, every point with a value plotted and labelled, and the
    dashed Pareto front joining, fastest first, the points no faster point beats (higher PSNR, lower
    rFID); the file is that figure (its pixel size)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    import msdd.eval.plots as plots

    figures = []
    subplots = plt.subplots

    def recording_subplots(*args, **kwargs):
        fig, axes = subplots(*args, **kwargs)
        figures.append(fig)
        return fig, axes

    monkeypatch.setattr(plots.plt, "subplots", recording_subplots)
    pts = [{"label": "teacher", "img_per_s": 1.0, "psnr": 20.0, "rfid": 3.0},
           {"label": "student", "img_per_s": 30.0, "psnr": 19.0, "rfid": 4.0},
           {"label": "dominated", "img_per_s": 10.0, "psnr": 18.0, "rfid": 5.0},  # slower and worse than "student"
           {"label": "no-rfid", "img_per_s": 3.0, "psnr": 19.5, "rfid": None}]
    path = plot_pareto(pts, tmp_path / "x.png", title="t")

    (fig,) = figures
    psnr_ax, rfid_ax = fig.axes
    assert "PSNR" in psnr_ax.get_ylabel() and "rFID" in rfid_ax.get_ylabel()
    assert psnr_ax.get_xscale() == rfid_ax.get_xscale() == "log"

    def scattered(ax):
        return sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections)

    def labels(ax):
        return sorted(t.get_text() for t in ax.texts)

    def front(ax):
        (line,) = ax.lines
        assert line.get_linestyle() == "--"
        return list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))

    assert scattered(psnr_ax) == sorted((p["img_per_s"], p["psnr"]) for p in pts)
    assert labels(psnr_ax) == sorted(p["label"] for p in pts)
    assert scattered(rfid_ax) == sorted((p["img_per_s"], p["rfid"]) for p in pts if p["rfid"] is not None)
    assert labels(rfid_ax) == ["dominated", "student", "teacher"]
    assert front(psnr_ax) == [(30.0, 19.0), (3.0, 19.5), (1.0, 20.0)]
    assert front(rfid_ax) == [(30.0, 4.0), (1.0, 3.0)]
    assert Image.open(path).size == (round(5.5 * 2 * 120), round(4.2 * 120))

    figures.clear()  # without any rFID: one panel; the baselines as horizontal lines on it
    plot_pareto([{k: v for k, v in p.items() if k != "rfid"} for p in pts], tmp_path / "y.png",
                baselines={"pca (256 floats)": 21.0})
    assert len(figures[0].axes) == 1 and Image.open(tmp_path / "y.png").size == (round(5.5 * 120), round(4.2 * 120))
    (ax,) = figures[0].axes
    assert [tuple(line.get_ydata()) for line in ax.lines if line.get_linestyle() == ":"] == [(21.0, 21.0)]
    assert "pca (256 floats)" in labels(ax)


def _free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from PIL import Image

    from msdd.data import load_photo

    one, two, photos = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "photos"
    photos.mkdir()
    for k in range(7):  # 7 photos and 3 unreadable files, spread over both processes
        Image.fromarray(np.ascontiguousarray(load_photo("chelsea")[10 * k:10 * k + 40, :40])).save(photos / f"{k}.png")
    for k in range(3):
        (photos / f"bad{k}.png").write_bytes(b"not an image")
    base = ["-m", "msdd.cli", "eval", "--model", str(model_dir), "--data", str(photos), "--pca-source", "none",
            "--batch-size", "3"]
    subprocess.run([sys.executable, *base, "--out", str(one)], check=True, env=env, capture_output=True)
    port = str(_free_port())  # not a fixed port: two test runs on one machine must not collide
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", port, *base, "--out", str(two)], check=True, env=env,
                   capture_output=True)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["protocol"]["processes"] == 2 and b["protocol"]["images"] == a["protocol"]["images"] == 7
    assert b["protocol"]["skipped_files"] == a["protocol"]["skipped_files"] == 3  # was: rank 0's count only
    assert b["metrics"]["psnr"] == pytest.approx(a["metrics"]["psnr"], abs=1e-4)
    assert b["metrics"]["ssim"] == pytest.approx(a["metrics"]["ssim"], abs=1e-5)


@pytest.mark.slow
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


def test_ssim_of_large_images_in_strips_and_of_tiny_ones(monkeypatch):
    import msdd.eval.metrics as metrics

    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 57, 40, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(2, 3, 57, 40, generator=g)).clamp(-1, 1)
    whole = ssim_per_image(b, a)
    monkeypatch.setattr(metrics, "STRIP_PIXELS", 400)  # strips of 10 rows: 6 of them, the last of 7
    heights, maps = [], metrics.ssim_maps
    monkeypatch.setattr(metrics, "ssim_maps", lambda p, t: heights.append(p.shape[-2]) or maps(p, t))
    assert torch.allclose(ssim_per_image(b, a), whole, atol=1e-6)
    assert heights == [15, 20, 20, 20, 20, 12]  # each strip with the 5 rows around it that its windows reach
    assert ssim_per_image(b[..., :5, :], a[..., :5, :]).isnan().all()  # a side under 6 px: no 11 px window
    assert not ssim_per_image(b[..., :6, :], a[..., :6, :]).isnan().any()


def test_a_flat_image_gives_strict_json_and_tiny_or_non_utf8_files_reconstruct(tmp_path, photo_folder, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(folder / "gray.png")  # bicubic gets it exactly
    Image.open(next(photo_folder.glob("*.png"))).save(folder / "photo.png")
    out = tmp_path / "eval.json"
    with pytest.warns(UserWarning, match="bicubic psnr not finite"):
        assert main(["eval", "--model", "tiny-64", "--data", str(folder), "--pca-source", "none",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert report["baselines"]["bicubic"]["psnr"] is None and report["metrics"]["psnr"] > 10
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((3, 300, 3), 90, np.uint8)).save(inputs / "thin.png")  # 3 px tall: no SSIM window fits
    name = os.path.join(os.fsencode(inputs), b"caf\xe9.png")  # not UTF-8: os.listdir gives it as surrogates
    Image.open(next(photo_folder.glob("*.png"))).save(name, format="PNG")
    assert main(["reconstruct", str(inputs), "--model", "tiny-64", "--keep-size", "--out", str(tmp_path / "r")]) == 0
    rows = (tmp_path / "r" / "metrics.csv").read_bytes().decode("utf-8", "surrogateescape").splitlines()
    assert rows[0] == "name,psnr_db,ssim" and len(rows) == 3
    thin = next(r for r in rows if r.startswith("thin"))
    assert thin.endswith(",") and float(thin.split(",")[1]) > 10  # PSNR, and no SSIM
    assert sorted(os.listdir(os.fsencode(tmp_path / "r" / "reconstructions"))) == [b"caf\xe9.png", b"thin.png"]
