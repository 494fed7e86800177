"""Library API: input handling, bad inputs, save/load round trip, RoPE, one-step marking."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from msdd.config import load_config
from msdd.families import Decoded
from msdd.hub import CONFIG_NAME, WEIGHTS_NAME
from msdd.models.rope import rope_angles
from msdd.tokenizer import Tokenizer

from conftest import tiny_config


@pytest.fixture
def tok():
    t = Tokenizer(tiny_config().model)
    torch.nn.init.normal_(t.decoder.final.linear.weight, std=0.1)
    return t.eval()


def test_accepts_float_uint8_and_pil(tok):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    z_float, z_u8 = tok.encode(x), tok.encode(u8)
    assert z_float.shape == (2, 8, 4)
    assert torch.allclose(z_float, z_u8, atol=0.05)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    assert tok.encode([pil, pil]).shape == (2, 8, 4)
    assert tok.encode(pil).shape == (1, 8, 4)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.rand(2, 3, 64, 64), ValueError, r"\(B, 3, 32, 32\)"),
        (torch.rand(2, 1, 32, 32), ValueError, r"\(B, 3, 32, 32\)"),
        (torch.rand(2, 3, 32, 32) * 255, ValueError, r"\[-1, 1\].*uint8"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.int32), TypeError, "uint8"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        ("image.png", TypeError, "tensor, numpy array or PIL"),
    ],
)
def test_encode_bad_inputs(tok, bad, err, match):
    with pytest.raises(err, match=match):
        tok.encode(bad)


@pytest.mark.parametrize("shape", [(2, 9, 4), (2, 8, 5), (8,)])
def test_decode_bad_latent_shape(tok, shape):
    with pytest.raises(ValueError, match=r"\(B, 8, 4\)"):
        tok.decode(torch.zeros(shape))


def test_decode_rejects_non_finite_latents(tok):
    with pytest.raises(ValueError, match="NaN"):
        tok.decode(torch.full((1, 8, 4), float("inf")))


def test_save_load_round_trip_gives_identical_decodes(tok, tmp_path):
    tok.latent_mean.fill_(0.5)
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    a = tok.decode(z, seed=3)
    tok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / CONFIG_NAME).exists() and (tmp_path / "m" / WEIGHTS_NAME).exists()
    loaded = Tokenizer.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.decode(z, seed=3), a)
    assert torch.equal(loaded.latent_mean, tok.latent_mean)
    assert loaded.config == tok.config


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an msdd model directory"):
        Tokenizer.from_pretrained(tmp_path / "empty")


def test_one_step_model_defaults_to_one_step_and_warns_once(tmp_path):
    from dataclasses import replace

    cfg = replace(tiny_config().model, one_step=True)
    tok = Tokenizer(cfg)
    assert tok.default_steps() == (1, 1, 1)
    z = torch.zeros(1, 8, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tok.decode(z)  # its own one step per stage: nothing to warn about
        tok.decode(z, steps=1)
        assert not w
        tok.decode(z, steps=4)
        tok.decode(z, steps=4)
    assert sum("distilled for one step" in str(x.message) for x in w) == 1
    with pytest.warns(UserWarning, match=r"distilled for one step per stage; decoding with \[1, 2, 1\]"):
        Tokenizer(cfg).decode(z, steps=[1, 2, 1])  # more than one step at any stage, not only at every one


def test_cfg_keyword_is_a_deprecated_name_of_guidance(tok):
    z, images = torch.randn(1, 8, 4), torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.warns(DeprecationWarning, match="guidance=") as caught:
        assert torch.equal(tok.decode(z, steps=1, cfg=2.0), tok.decode(z, steps=1, guidance=2.0))
        assert torch.equal(tok.reconstruct(images, steps=1, cfg=2.0), tok.reconstruct(images, steps=1, guidance=2.0))
        with pytest.raises(ValueError, match=r"guidance \(--cfg\) must be .* got -1"):  # the value is passed on
            tok.decode(z, cfg=-1.0)
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller
    with pytest.raises(TypeError, match="once"):
        tok.decode(z, guidance=2.0, cfg=2.0)


def test_decode_stages_returns_the_images_and_every_stage_clamped(tok):
    """`decode_stages` is `decode` that also keeps the image at the end of every stage: one type whatever the
    arguments (`Decoded`), its images those `decode` gives for the same noise, every stage the family's clamped to
    [-1, 1]. `decode(return_stages=True)`, its old form, still works, with a DeprecationWarning at the caller's line."""
    torch.nn.init.normal_(tok.decoder.final.linear.weight, std=10.0)  # stages far outside [-1, 1] before the clamp
    z = torch.randn(2, 8, 4)
    out = tok.decode_stages(z, steps=1, seed=3)
    assert isinstance(out, Decoded) and torch.equal(out.images, tok.decode(z, steps=1, seed=3))
    # both draw their noise from seed 0 when given neither a seed nor a generator (the same call, the same image)
    assert torch.equal(tok.decode_stages(z, steps=1).images, tok.decode(z, steps=1, seed=0))
    assert torch.equal(tok.decode(z, steps=1), tok.decode_stages(z, steps=1, seed=0).images)
    with torch.no_grad():
        raw = tok.sample(z, tok.resolve_steps(1), 1.0, torch.Generator().manual_seed(3))
    assert [s.shape[-1] for s in out.stages] == list(tok.config.stage_resolutions)
    assert all(r.abs().max() > 2 for r in raw.stages)  # the clamp has work to do at every stage
    assert torch.allclose(out.images, raw.images.clamp(-1, 1), atol=1e-4) and out.images.min() == -1
    for stage, r in zip(out.stages, raw.stages):
        assert torch.allclose(stage, r.clamp(-1, 1), atol=1e-4)
    with pytest.warns(DeprecationWarning, match=r"decode_stages\(z, ...\)") as caught:
        images, stages = tok.decode(z, steps=1, seed=3, return_stages=True)
    assert {w.filename for w in caught} == {__file__}
    assert torch.equal(images, out.images) and all(torch.equal(a, b) for a, b in zip(stages, out.stages))


def test_reconstruct_encodes_with_the_precision_it_decodes_with():
    """`reconstruct(x, bf16=True)` is `decode(encode(x, bf16=True), bf16=True)`: the precision flags apply to the
    encoder too, whose bf16 latents differ from its float32 ones (the shipped student)."""
    tok = Tokenizer.from_pretrained("tiny-64-student")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z16 = tok.encode(x, bf16=True)
    assert not torch.equal(z16, tok.encode(x))
    assert torch.equal(tok.reconstruct(x, seed=3, bf16=True), tok.decode(z16, seed=3, bf16=True))


def test_latent_normalisation_round_trip(tok):
    tok.latent_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    tok.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    z = torch.randn(3, 8, 4)
    assert torch.allclose(tok.denormalize_latents(tok.normalize_latents(z)), z, atol=1e-6)


def test_spatial_latents_are_normalised_along_their_channel_axis():
    """A spatial latent (B, C, h, w) keeps its channels at dim -3: channel c is shifted and scaled by its own
    statistics (here h = w = C, so statistics laid along the last axis would broadcast and go unnoticed)."""
    over = ["model.family=ssdd", "model.ssdd.latent_kind=spatial", "model.ssdd.base_channels=8",
            "model.ssdd.channel_mults=[1,2]", "model.ssdd.mid_depth=1", "model.ssdd.mid_heads=2",
            "model.ssdd.mid_mlp_hidden=32", "model.ssdd.encoder_channels=[8,8,16,16]", "model.linear_path=false"]
    tok = Tokenizer(tiny_config(*over).model)
    mean, std = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([2.0, 0.5, 1.0, 3.0])
    tok.latent_mean.copy_(mean)
    tok.latent_std.copy_(std)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = (z - mean.view(1, 4, 1, 1)) / std.view(1, 4, 1, 1)
    torch.testing.assert_close(tok.normalize_latents(z), expected)
    torch.testing.assert_close(tok.denormalize_latents(expected), z)
    with pytest.raises(ValueError, match="at dim -3"):
        tok.normalize_latents(torch.zeros(2, 4, 4, 3).transpose(1, 3))  # channels last: (2, 3, 4, 4)


def test_rope_lower_stages_use_the_centred_crop_of_the_final_grid():
    full = rope_angles(8, 8, 0, 16, "none")  # (64, 8)
    crop = rope_angles(4, 8, 0, 16, "none")  # (16, 8)
    full = full.view(8, 8, -1)[2:6, 2:6].reshape(16, -1)
    assert torch.allclose(full, crop)


def test_rope_context_schemes():
    none = rope_angles(4, 8, 5, 16, "none")[16:]
    assert torch.all(none == 0)
    oned = rope_angles(4, 8, 5, 16, "1d")[16:]
    assert torch.allclose(oned[:, 0], torch.arange(5, dtype=torch.float64))
    cross = rope_angles(4, 8, 5, 16, "cross")[16:]
    assert torch.all(cross[:, 0] == 4)  # row = the current stage's grid width
    # head dim 16 -> 8 rotated pairs: 4 for the row, 4 for the column
    assert torch.allclose(cross[:, 4], torch.arange(5, dtype=torch.float64))  # column = token index
    # column frequencies use base 10000 * L / grid
    assert cross[1, 5].item() == pytest.approx((10000 * 5 / 4) ** (-1 / 4))


def test_paper_sizes():
    """Parameter counts of paper-256 against the reference (decoder ~250M, encoder ~171M)."""
    with torch.device("meta"):
        tok = Tokenizer(load_config("paper-256").model)
    dec = sum(p.numel() for p in tok.decoder.parameters()) / 1e6
    enc = sum(p.numel() for p in tok.encoder.parameters()) / 1e6
    assert 240 < dec < 260
    assert 160 < enc < 180


def test_bf16_decode_is_close_to_fp32():
    """bf16 autocast decodes of the tiny-64 teacher (shipped, trained) against fp32 on held-out photos, same
    noise: within a small fraction of what another noise draw changes (65-72 dB apart, measured), equally
    faithful to the photos, in float32, and really computed in bf16 (not bit-identical)."""
    from msdd.data import embedded_eval_set
    from msdd.eval.metrics import psnr_per_image

    tok = Tokenizer.from_pretrained("tiny-64-teacher")
    x = embedded_eval_set(64)[0][:4]
    z, z16 = tok.encode(x), tok.encode(x, bf16=True)
    assert z16.dtype == torch.float32 and 0 < (z16 - z).abs().max() < 0.05 * z.abs().max()
    fp32 = tok.decode(z, steps=2, seed=1)
    bf16 = tok.decode(z, steps=2, seed=1, bf16=True)
    other_noise = tok.decode(z, steps=2, seed=2)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32)
    assert (psnr_per_image(bf16, fp32) > 55).all(), psnr_per_image(bf16, fp32)
    assert (bf16 - fp32).abs().mean() < 0.05 * (other_noise - fp32).abs().mean()
    torch.testing.assert_close(psnr_per_image(bf16, x), psnr_per_image(fp32, x), rtol=0, atol=0.1)


def test_encode_and_decode_say_they_drop_gradients_and_name_the_differentiable_path():
    tok = Tokenizer.from_pretrained()
    x = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_()
    with pytest.warns(UserWarning, match=r"Tokenizer.encode runs without gradients.*use tok.encoder\(x\)") as rec:
        z = tok.encode(x)
    assert rec[0].filename == __file__  # the user's line
    z.requires_grad_()
    with pytest.warns(UserWarning, match=r"Tokenizer.decode runs without gradients.*use tok.sample\(z, steps"):
        assert not tok.decode(z).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inputs that need no gradient: no warning
        tok.decode(tok.encode(x.detach()))
    image, _ = tok.sample(z, tok.default_steps(), 1.0, torch.Generator().manual_seed(0))
    image.square().mean().backward()  # the differentiable decode the warning names
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_a_decode_after_the_kernels_are_switched_off_takes_pytorchs_ops(monkeypatch):
    """A model whose layers were packed for msdd's CPU kernels decodes with PyTorch's ops once the kernels are
    switched off in the same process (`MSDD_CPU_KERNELS=0`, then `library.cache_clear()`): the same images to float
    rounding, and int8 ones to the two int8 paths' rounding (before: AttributeError, the layers' packed weights
    called the library that was gone)."""
    from msdd.models import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("msdd's CPU kernels do not run here")
    tok = Tokenizer.from_pretrained()
    z = tok.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    on, on_int8 = tok.decode(z), tok.decode(z, int8=True)
    monkeypatch.setenv("MSDD_CPU_KERNELS", "0")
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        torch.testing.assert_close(tok.decode(z), on, rtol=0, atol=1e-5)
        torch.testing.assert_close(tok.decode(z, int8=True), on_int8, rtol=0, atol=0.02)
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
