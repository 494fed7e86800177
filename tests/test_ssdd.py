"""The SSDD family (U-Net/transformer flow decoder, single-step distillation) and the plain autoencoder
family: shapes, determinism, save/load, training, distillation, REPA, bench rows, info."""

import contextlib
import io
import json
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from msdd.cli import main
from msdd.config import load_config
from msdd.data import EmbeddedCrops
from msdd.flow.path import randn
from msdd.flow.ssdd import repa_loss, sample_ssdd, ssdd_loss, time_schedule
from msdd.tokenizer import Tokenizer
from msdd.train.distill import Distiller, build_distiller
from msdd.train.distill_ssdd import SSDDDistiller
from msdd.train.stage1 import Stage1Trainer, compute_latent_stats

from conftest import (
    assert_grid_shows, assert_same_runs, assert_training_loss_follows_a_setting, random_vgg16_file,
    straight_and_resumed, tiny_args, tiny_config,
)  # fmt: skip

# 32 px, U-Net 32 -> 16 px (8 / 16 channels), one transformer block of width 16 over 16 x 16 positions
SSDD_TINY = [
    "model.family=ssdd", "model.ssdd.base_channels=8", "model.ssdd.channel_mults=[1,2]",
    "model.ssdd.mid_depth=1", "model.ssdd.mid_heads=2", "model.ssdd.mid_mlp_hidden=32", "model.ssdd.steps=4",
    "model.ssdd.encoder_channels=[8,8,16,16]", "train.bf16=false",
    "model.linear_path=false",  # the family without the PCA path (test_linear.py covers it with one)
]


def ssdd_config(*extra: str, kind: str = "tokens"):
    return tiny_config(*SSDD_TINY, f"model.ssdd.latent_kind={kind}", *extra)


def _randomise_output(tok: Tokenizer) -> Tokenizer:
    """The output conv starts at zero (v = 0); give it weights so that decodes depend on z."""
    torch.nn.init.normal_(tok.decoder.out_conv.weight, std=0.05)
    return tok.eval()


@pytest.mark.parametrize("setting, values", [("t_sampling", ("logit_normal", "uniform")), ("lpips_weight", (0.0, 0.5))])
def test_the_ssdd_familys_loss_is_ssdd_loss_with_its_model_ssdd_settings(setting, values):
    """`Tokenizer.training_loss` of the SSDD family is `ssdd_loss` given model.ssdd's settings: each value gives
    another loss, equal to ssdd_loss called with it by hand (LPIPS: a stand-in, the mean absolute error per image)."""

    def make(value):
        tok = _randomise_output(Tokenizer(ssdd_config(f"model.ssdd.{setting}={value}").model)).train()
        assert getattr(tok.config.ssdd, setting) == value
        return tok

    def by_hand(tok, images, perceptual, generator):
        sc = tok.config.ssdd
        return ssdd_loss(tok.decoder, images, tok.encoder(images), t_sampling=sc.t_sampling, perceptual=perceptual,
                         lpips_weight=sc.lpips_weight, generator=generator)[0]

    assert_training_loss_follows_a_setting(make, values, by_hand)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "log.jsonl")]


# ---------------------------------------------------------------------------------------------
# shapes, determinism, save / load


@pytest.mark.parametrize("kind, latent", [("tokens", (8, 4)), ("spatial", (4, 4, 4))])
def test_shapes_for_both_latent_kinds(kind, latent):
    tok = _randomise_output(Tokenizer(ssdd_config(kind=kind).model))
    assert tok.config.latent_shape == latent
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    z = tok.encode(images)
    assert z.shape == (3, *latent)
    x = tok.decode(z)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert tok.default_steps() == (4,)
    assert tok.decode(z[0]).shape == (1, 3, 32, 32)  # a single latent without the batch axis
    bad = torch.zeros(3, *[n + 1 for n in latent])
    with pytest.raises(ValueError, match=r"\(B, " + ", ".join(map(str, latent)) + r"\)"):
        tok.decode(bad)
    assert tok.config.compression == pytest.approx(32 * 32 * 3 / torch.Size(latent).numel())


@pytest.mark.parametrize("kind", ["tokens", "spatial"])
def test_decode_is_deterministic_per_generator(kind):
    tok = _randomise_output(Tokenizer(ssdd_config(kind=kind).model))
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    a, b = tok.decode(z, seed=3), tok.decode(z, seed=3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, tok.decode(z, seed=4))
    # one generator per sample: a sample's decode does not depend on the rest of the batch
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    both = tok.decode(z, generator=gens())
    first = tok.decode(z[:1], generator=gens()[:1])
    assert torch.allclose(both[:1], first, atol=1e-5)
    # the latent matters
    assert not torch.allclose(a, tok.decode(z.flip(0), seed=3))


def test_steps_cfg_and_one_step_student():
    tok = Tokenizer(ssdd_config().model)
    z = torch.zeros(1, 8, 4)
    assert tok.resolve_steps(6) == (6,) and tok.resolve_steps([2]) == (2,)
    with pytest.raises(ValueError, match="an int >= 1"):
        tok.resolve_steps([2, 2])
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        tok.decode(z, guidance=2.0)
    with pytest.raises(ValueError, match=r"model\.sampling\.cfg"):
        ssdd_config("model.sampling.cfg=2")
    student = Tokenizer(replace(ssdd_config().model, one_step=True))
    assert student.default_steps() == (1,)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        student.decode(z, steps=4)
        student.decode(z, steps=4)
    assert sum("distilled for one step" in str(x.message) for x in w) == 1


def test_sampler_follows_the_straight_path():
    """With the exact velocity of the path to a known image, every schedule ends exactly on it."""
    target = torch.rand(2, 3, 8, 8) * 2 - 1

    def oracle(x, t, z):  # x_t = (1 - t) x* + t n  ->  v = n - x* = (x_t - x*) / t
        return (x - target) / t.view(-1, 1, 1, 1)

    oracle.image_size = 8
    for steps, shift in [(1, 1.0), (4, 2.0), (7, 3.0)]:
        out = sample_ssdd(oracle, torch.zeros(2, 1), steps, shift, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, target, atol=1e-5)
    ts = time_schedule(4, 2.0)
    assert ts == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0])
    with pytest.raises(ValueError):
        time_schedule(0, 2.0)


def test_loss_targets_the_velocity_noise_minus_image():
    """The family's flow target is v = n - x (t = 1 is noise, as the sampler integrates it): a network that returns
    exactly n - x for the noise the loss draws (the first draw of its generator) scores 0, and its one-step
    estimate x_t - t v is the image itself (a perceptual stand-in scores 0 too); the opposite sign, x - n,
    scores 4 MSE(n, x)."""
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = randn(tuple(images.shape), torch.Generator().manual_seed(0), images)

    class Oracle:
        prediction, sign = "v", 1.0

        def network(self, x_t, t, z, return_features=False):
            return self.sign * (noise - images)

    def perceptual(x, y):
        return (x - y).abs().mean(dim=(1, 2, 3))

    oracle = Oracle()
    loss, terms = ssdd_loss(oracle, images, torch.zeros(2, 1), perceptual=perceptual, lpips_weight=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert terms["loss_fm"].item() == 0.0
    assert terms["loss_lpips"].item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)
    oracle.sign = -1.0
    _, terms = ssdd_loss(oracle, images, torch.zeros(2, 1), generator=torch.Generator().manual_seed(0))
    assert terms["loss_fm"].item() == pytest.approx(4 * F.mse_loss(noise, images).item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["tokens", "spatial"])
def test_save_load_round_trip_gives_identical_decodes(kind, tmp_path):
    tok = _randomise_output(Tokenizer(ssdd_config(kind=kind).model))
    tok.latent_mean.fill_(0.25)
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    a = tok.decode(z, seed=1)
    tok.save_pretrained(tmp_path / "m")
    loaded = Tokenizer.from_pretrained(tmp_path / "m")
    assert loaded.config == tok.config and loaded.config.family == "ssdd"
    assert torch.equal(loaded.decode(z, seed=1), a)
    assert torch.equal(loaded.encode(torch.zeros(1, 3, 32, 32)), tok.encode(torch.zeros(1, 3, 32, 32)))
    assert torch.equal(loaded.latent_mean, tok.latent_mean)


@pytest.mark.parametrize("kind", ["tokens", "spatial"])
def test_latent_statistics_are_per_channel_over_the_first_max_images(kind):
    """The mean and std of every latent channel over all positions of the first `max_images` images, in batches:
    5 images in batches of 4 take one image of the second batch (not 4 + 4, nor the first batch alone)."""
    tok = Tokenizer(ssdd_config(kind=kind).model)
    dataset = EmbeddedCrops(32, length=12, seed=0)
    mean, std = compute_latent_stats(tok, dataset, batch_size=4, max_images=5)
    with torch.no_grad():
        z = tok.encoder(torch.stack([dataset[i][0] for i in range(5)])).double()
    z = z.movedim(1, -1).reshape(-1, 4) if kind == "spatial" else z.reshape(-1, 4)  # (positions, channels)
    assert z.shape == (5 * (16 if kind == "spatial" else 8), 4) and mean.shape == std.shape == (4,)
    torch.testing.assert_close(mean.double(), z.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(std.double(), z.std(0, correction=0), rtol=1e-4, atol=1e-6)


def test_spatial_latent_statistics_normalise_per_channel():
    tok = Tokenizer(ssdd_config(kind="spatial").model)
    mean, std = compute_latent_stats(tok, EmbeddedCrops(32, length=8, seed=0), batch_size=4, max_images=8)
    tok.latent_mean.copy_(mean)
    tok.latent_std.copy_(std)
    z = torch.randn(2, 4, 4, 4)
    assert torch.allclose(tok.denormalize_latents(tok.normalize_latents(z)), z, atol=1e-5)
    zn = tok.normalize_latents(tok.encode(torch.rand(8, 3, 32, 32) * 2 - 1))
    assert zn.shape == (8, 4, 4, 4)


# ---------------------------------------------------------------------------------------------
# training and distillation


@pytest.mark.slow
def test_tiny_ssdd_overfits_a_few_images(photo_folder, tmp_path):
    cfg = ssdd_config(f"data.source={photo_folder}", f"data.eval_source={photo_folder}", "train.log_every=1",
                      "train.ckpt_every=1000", "train.batch_size=6")
    Stage1Trainer(cfg, tmp_path / "run").fit(max_steps=300, progress=False)
    losses = _losses(tmp_path / "run")
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    # the latent identifies each image, so the flow's velocity becomes predictable: far below the start
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert list((tmp_path / "run" / "grids").glob("*.png"))
    log = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert "loss_fm" in log


@pytest.fixture(scope="module")
def ssdd_teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("ssdd-teacher")
    Stage1Trainer(ssdd_config("train.ckpt_every=1000"), run).fit(max_steps=200, progress=False)
    return run / "model"


@pytest.mark.slow
def test_single_step_distillation_reduces_student_teacher_gap(ssdd_teacher, tmp_path):
    cfg = ssdd_config("distill.batch_size=8", "distill.lr=3e-4", "distill.warmup_steps=10", "distill.max_steps=150",
                      "distill.log_every=1000", "distill.ckpt_every=1000", "distill.grid_every=1000",
                      "distill.perceptual=none", "distill.lambda_pix=0")  # teacher targets only
    d = build_distiller(cfg, ssdd_teacher, tmp_path / "d")
    assert isinstance(d, SSDDDistiller)
    ds = EmbeddedCrops(32, length=16, seed=123)  # crops and noise the distillation never sees
    images = torch.stack([ds[i][0] for i in range(16)])

    def gap(decoder):
        with torch.no_grad():
            z = d.teacher.encoder(images)
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
            return F.mse_loss(d.student_images(decoder, z, noise), d.teacher_images(z, noise)).item()

    before = gap(d.student.decoder)
    enc_before = {k: v.clone() for k, v in d.student.encoder.state_dict().items()}
    d.fit(progress=False)
    after = gap(d.ema.module.decoder)
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(enc_before[k], v) for k, v in d.student.encoder.state_dict().items())
    student = Tokenizer.from_pretrained(tmp_path / "d" / "model")
    assert student.config.one_step and student.config.family == "ssdd" and student.default_steps() == (1,)
    assert list((tmp_path / "d" / "grids").glob("*.png"))


def test_ssdd_decodes_with_its_configured_time_shift():
    """The SSDD family samples with the model's own schedule t_i = (1 - i/N)^shift (model.ssdd.shift): its decode is
    `sample_ssdd` at that shift, and another shift gives another image."""
    tok = _randomise_output(Tokenizer(ssdd_config("model.ssdd.shift=3.0").model))
    z = torch.randn(2, *tok.config.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = tok.family.sample(tok.decoder, z, (3,), 1.0, torch.Generator().manual_seed(1)).images
        at = {shift: sample_ssdd(tok.decoder, z, 3, shift, generator=torch.Generator().manual_seed(1))
              for shift in (3.0, 1.0)}
    assert torch.equal(got, at[3.0]) and (got - at[1.0]).abs().max() > 1e-3


def test_ssdd_distill_ties_the_student_to_the_real_image_by_lambda_pix(tmp_path):
    """The SSDD distiller's generator loss is MSE(student, teacher) + distill.lambda_pix * MSE(student, real image)
    (no perceptual network here): with lambda_pix 0.5 the logged l_gen is l_mse + 0.5 l_pix of the same step, and
    with lambda_pix 0 the term is gone."""
    teacher = tmp_path / "teacher"
    _randomise_output(Tokenizer(ssdd_config().model)).save_pretrained(teacher)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for weight in (0.5, 0.0):
        cfg = ssdd_config("distill.batch_size=2", "distill.perceptual=none", f"distill.lambda_pix={weight}")
        d = SSDDDistiller(cfg, teacher, tmp_path / f"d{weight}")
        _, out = d.micro_step(images, torch.Generator().manual_seed(0))
        if weight:
            assert out["l_pix"] > 0.01
            assert out["l_gen"] == pytest.approx(out["l_mse"] + weight * out["l_pix"], rel=1e-5)
        else:
            assert "l_pix" not in out and out["l_gen"] == pytest.approx(out["l_mse"], rel=1e-6)


def test_the_ssdd_distillers_step_and_grid_are_its_terms_by_hand(tmp_path):
    """SSDDDistiller.micro_step redone by hand from the same draws: one noise per image shared by the teacher
    (model.ssdd.steps = 3 steps at model.ssdd.shift = 2.5, clamped) and the student (one step from it, same shift), the
    teacher's encoder's latents, and loss = MSE(student, teacher) + lambda_perc LPIPS(student, teacher) + lambda_pix
    MSE(student, real) (a random VGG16 file); the grid shows real | teacher | clamped EMA student | error x 4 of the
    eval images, decoded from seed 0's noise."""
    teacher = tmp_path / "teacher"
    _randomise_output(Tokenizer(ssdd_config("model.ssdd.steps=3", "model.ssdd.shift=2.5").model)).save_pretrained(
        teacher)
    cfg = ssdd_config("distill.batch_size=2", "distill.perceptual=lpips", "distill.lambda_perc=0.5",
                      "distill.lambda_pix=0.3")
    d = SSDDDistiller(cfg, teacher, tmp_path / "d", vgg_weights=random_vgg16_file(tmp_path / "vgg16.pth"))
    with torch.no_grad():  # a student, and its EMA, that are no longer the teacher
        for seed, decoder in enumerate((d.student.decoder, d.ema.module.decoder)):
            g = torch.Generator().manual_seed(seed)
            for p in decoder.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, out = d.micro_step(images, torch.Generator().manual_seed(4))
    noise = randn(tuple(images.shape), torch.Generator().manual_seed(4), images)
    with torch.no_grad():
        z = d.teacher.encoder(images)
        target = sample_ssdd(d.teacher.decoder, z, 3, 2.5, noise=noise).clamp(-1, 1)
        x = sample_ssdd(d.student.decoder, z, 1, 2.5, noise=noise)
        terms = {"l_mse": F.mse_loss(x, target), "l_perc": d.perceptual(x, target).mean(),
                 "l_pix": F.mse_loss(x, images)}
    assert (target - sample_ssdd(d.teacher.decoder, z, 1, 2.5, noise=noise)).abs().max() > 1e-2  # 3 steps matter
    for name, value in terms.items():
        assert out[name] == pytest.approx(value.item(), rel=1e-5), name
    want = terms["l_mse"] + 0.5 * terms["l_perc"] + 0.3 * terms["l_pix"]
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and out["l_gen"] == pytest.approx(want.item(), rel=1e-5)
    real = d.eval_images
    noise = randn(tuple(real.shape), torch.Generator().manual_seed(0), real)
    with torch.no_grad():
        z = d.teacher.encoder(real)
        student = sample_ssdd(d.ema.module.decoder, z, 1, 2.5, noise=noise).clamp(-1, 1)
        columns = [real, sample_ssdd(d.teacher.decoder, z, 3, 2.5, noise=noise).clamp(-1, 1), student,
                   ((student - real).abs() * 4 - 1).clamp(-1, 1)]
    assert_grid_shows(d.save_grid(), columns, 32)


def test_ssdd_distill_resume_continues_exactly(tmp_path):
    """4 SSDD distillation steps in one run equal 2, a resume from their checkpoint and 2 more: the same logged
    losses, student and EMA (whose warm-up ramp needs the stored update count). The teacher is an untrained
    model with a random output layer (its decodes depend on z and the noise): exactness needs no trained one."""
    teacher = tmp_path / "teacher"
    _randomise_output(Tokenizer(ssdd_config().model)).save_pretrained(teacher)
    cfg = ssdd_config("distill.batch_size=2", "distill.ckpt_every=2", "distill.log_every=1",
                      "distill.grid_every=1000", "distill.perceptual=none")
    straight, resumed = straight_and_resumed(
        lambda run, require_resume: SSDDDistiller(cfg, teacher, run, require_resume=require_resume), tmp_path)

    assert len(open(tmp_path / "a" / "log.jsonl").readlines()) == 4
    assert_same_runs(tmp_path / "a", tmp_path / "b", ("l_gen", "l_mse", "l_pix", "grad_norm", "lr"),
                     {"student": (straight.student, resumed.student), "ema": (straight.ema.module, resumed.ema.module)})


def test_distill_cli_dispatches_on_the_teacher_family(ssdd_teacher, tmp_path, capsys):
    args = tiny_args(*SSDD_TINY, "distill.batch_size=4")
    assert main(["distill", "--teacher", str(ssdd_teacher), "--run-dir", str(tmp_path / "d"), "--max-steps", "2",
                 *args]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "d" / "model").config.one_step
    with pytest.raises(ValueError, match="'ssdd' family"):
        Distiller(ssdd_config(), ssdd_teacher, tmp_path / "x")
    student_dir = tmp_path / "d" / "model"
    assert main(["distill", "--teacher", str(student_dir), "--run-dir", str(tmp_path / "y"), *args]) == 2
    assert "already a distilled one-step student" in capsys.readouterr().err


def test_plain_family_trains_and_decodes_in_one_deterministic_pass(photo_folder, tmp_path):
    cfg = tiny_config("model.family=plain", f"data.source={photo_folder}", f"data.eval_source={photo_folder}",
                      "train.log_every=1", "train.ckpt_every=1000", "train.batch_size=6", "model.linear_path=false")
    trainer = Stage1Trainer(cfg, tmp_path / "run")
    trainer.fit(max_steps=150, progress=False)
    losses = _losses(tmp_path / "run")
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    tok = Tokenizer.from_pretrained(tmp_path / "run" / "model")
    assert tok.default_steps() == (1,) and tok.resolve_steps([5, 5, 5]) == (1,)
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    a = tok.decode(z, seed=0)
    assert torch.equal(a, tok.decode(z, seed=1, steps=5, guidance=3.0))  # no noise, one pass, no guidance
    assert tok.passes_per_image(tok.default_steps(), 1.0) == 1
    with pytest.raises(ValueError, match="plain autoencoder"):
        build_distiller(cfg, tmp_path / "run" / "model", tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# REPA (DINOv2)


def test_missing_dinov2_weights_for_repa_names_file_and_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf"))
    monkeypatch.delenv("MSDD_DINOV2_WEIGHTS", raising=False)
    pytest.importorskip("timm")
    with pytest.raises(FileNotFoundError,
                       match=r"dinov2_vits14_pretrain\.pth.*--dinov2-weights[\s\S]*model\.ssdd\.repa_weight"):
        Stage1Trainer(ssdd_config("model.ssdd.repa_weight=0.5"), tmp_path / "r")
    args = tiny_args(*SSDD_TINY, "model.ssdd.repa_weight=0.5")
    assert main(["train", "--run-dir", str(tmp_path / "r2"), "--max-steps", "1", *args,
                 "--dinov2-weights", str(tmp_path / "nope.pth")]) == 2
    assert "--dinov2-weights" in capsys.readouterr().err


def random_dinov2_file(path):
    """timm's ViT-S/14 (DINOv2's network) with random weights, saved at `path` as Meta's file is (with its mask
    token): a REPA target network that runs offline. Returns the network (eval mode, any image size)."""
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    torch.save({**vit.state_dict(), "mask_token": torch.zeros(1, 384)}, path)
    return vit


def test_repa_loss_with_a_dinov2_weights_file(tmp_path):
    """REPA end to end with a real ViT-S/14 state dict file (randomly initialised: the test checks loading,
    shapes and where gradients go, not DINOv2's features)."""
    from msdd.models.repa import DinoV2Features

    random_dinov2_file(tmp_path / "dinov2_vits14_pretrain.pth")
    dino = DinoV2Features(tmp_path / "dinov2_vits14_pretrain.pth")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = dino(images)
    assert feats.shape == (2, 256, 384) and not feats.requires_grad
    tok = Tokenizer(ssdd_config("model.ssdd.repa_weight=0.5").model)
    projected = []
    tok.decoder.repa_proj.register_forward_hook(lambda module, args, out: projected.append(out.detach()))
    loss, terms = tok.training_loss(images, torch.Generator().manual_seed(0), repa=dino)
    assert "loss_repa" in terms and 0 < terms["loss_repa"] < 2
    # the term aligns the projected bottleneck tokens with the features of the clean images
    assert len(projected) == 1 and terms["loss_repa"] == repa_loss(projected[0], dino(images))
    loss.backward()
    assert tok.decoder.repa_proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dino.parameters())
    # aligned features give zero loss, whatever the two grids
    target = torch.randn(2, 16, 384)
    assert repa_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-5)
    assert repa_loss(torch.randn(2, 64, 384), target).item() > 0.5


def test_stage_1_with_repa_trains_on_the_dinov2_file_it_is_given(tmp_path):
    """model.ssdd.repa_weight > 0: the trainer builds the REPA target network from `dinov2_weights` (a random ViT-S/14
    file: a network that runs offline), logs the REPA term and adds weight x term to the loss; the flow term of the
    first step is that of the same run without REPA (the same noise and times), and the projection head trains."""
    dino = tmp_path / "dinov2_vits14_pretrain.pth"
    vit = random_dinov2_file(dino)
    logs, trainers = {}, {}
    for weight in (0.0, 0.5):
        cfg = ssdd_config(f"model.ssdd.repa_weight={weight}", "train.log_every=1")
        trainers[weight] = Stage1Trainer(cfg, tmp_path / str(weight), dinov2_weights=dino if weight else None)
        if weight:
            start = trainers[weight].tok.decoder.repa_proj[0].weight.detach().clone()
        trainers[weight].fit(max_steps=1, progress=False)
        logs[weight] = json.loads((tmp_path / str(weight) / "log.jsonl").read_text())
    with_repa = trainers[0.5]
    assert trainers[0.0].repa is None and "loss_repa" not in logs[0.0]
    assert torch.equal(with_repa.repa.vit.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert logs[0.5]["loss_fm"] == logs[0.0]["loss_fm"] and logs[0.5]["loss_repa"] > 0.1
    assert logs[0.5]["loss"] == pytest.approx(logs[0.0]["loss_fm"] + 0.5 * logs[0.5]["loss_repa"], rel=1e-5)
    assert not torch.equal(with_repa.tok.decoder.repa_proj[0].weight, start)


@pytest.mark.parametrize("kind", ["tokens", "spatial"])
def test_the_unet_is_conditioned_on_the_pooled_latent_as_well_as_the_time(kind):
    """SPEC 10: the adaptive norms' conditioning is embed(t) + MLP(mean over positions of Linear(m)): two latents at
    one time give two conditionings (the latent also enters as input channels, so a decoder conditioned on the time
    alone still decodes, only worse: no output test sees it)."""
    tok = Tokenizer(ssdd_config(kind=kind).model).eval()
    conds = []
    tok.decoder.down[0][0].ada.register_forward_pre_hook(lambda module, args: conds.append(args[0]))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, *tok.config.latent_shape, generator=g)
    x, t = torch.randn(1, 3, 32, 32, generator=g), torch.full((1,), 0.5)
    with torch.no_grad():
        for i in range(2):
            tok.decoder(x, t, z[i:i + 1])
    assert len(conds) == 2 and (conds[0] - conds[1]).abs().max() > 1e-4


def test_repa_features_see_the_images_with_imagenet_normalisation(tmp_path):
    """DINOv2 was trained on ImageNet-normalised [0, 1] pixels: the REPA target of images in [-1, 1] is the ViT's
    patch tokens of ((x + 1) / 2 - mean) / std resized to 224 px. Feeding [-1, 1] straight in (or a wrong mean / std)
    gives the ViT other inputs than it knows, and REPA aligns the decoder with features of wrong images."""
    from msdd.models.discriminator import IMAGENET_MEAN, IMAGENET_STD
    from msdd.models.repa import DinoV2Features

    torch.manual_seed(0)
    vit = random_dinov2_file(tmp_path / "dinov2_vits14_pretrain.pth")
    dino = DinoV2Features(tmp_path / "dinov2_vits14_pretrain.pth")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(((images + 1) / 2 - mean) / std, size=(224, 224), mode="bilinear", align_corners=False,
                      antialias=True)
    with torch.no_grad():
        expected = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    got = dino(images)
    assert got.shape == (2, 256, 384)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ssdd_loss_terms_with_a_perceptual_stand_in():
    tok = Tokenizer(ssdd_config().model)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    calls = []

    def perceptual(x, y):
        calls.append(x.shape)
        return (x - y).abs().mean(dim=(1, 2, 3))

    loss, terms = ssdd_loss(tok.decoder, images, tok.encoder(images), perceptual=perceptual, lpips_weight=0.5,
                            generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss_fm", "loss_lpips"} and calls == [(2, 3, 32, 32)]
    assert loss.item() == pytest.approx((terms["loss_fm"] + 0.5 * terms["loss_lpips"]).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# presets, info, bench


def test_presets_and_info(capsys):
    assert main(["info", "--preset", "ssdd-m-256"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "ssdd" and info["latent"] == [4, 32, 32] and info["compression"] == 48
    assert info["ssdd"]["base_channels"] == 96 and info["ssdd"]["mid_depth"] == 12
    assert info["ssdd"]["channel_mults"] == [1, 2, 3, 3] and info["ssdd"]["bottleneck_grid"] == 32
    assert 40 < info["params_decoder_M"] < 70
    # its GFLOP numbers against a count of the real decode: tests/test_flops.py (ssdd-tiny-64)
    assert main(["info", "--preset", "ssdd-tiny-64"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["latent"] == [32, 8] and tiny["compression"] == 48
    assert load_config("tiny-64").model.compression == tiny["compression"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.family"):
        tiny_config("model.family=vae")
    with pytest.raises(ValueError, match=r"model\.ssdd\.latent_kind"):
        ssdd_config(kind="grid")
    with pytest.raises(ValueError, match=r"model\.ssdd\.mid_heads"):
        ssdd_config("model.ssdd.mid_heads=3")
    with pytest.raises(ValueError, match=r"model\.ssdd\.encoder_channels"):
        ssdd_config("model.ssdd.encoder_channels=[8,8,16]")


def test_bench_lists_the_ssdd_rows(tmp_path):
    out = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(["bench", "--quick", "--threads", "1", "--json", str(out),
                     "--contenders", "student,ssdd-student,ssdd-teacher"]) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["contenders"]}
    assert list(rows) == ["student", "ssdd-student", "ssdd-teacher"]
    assert report["ssdd_preset"] == "ssdd-tiny-64" and report["resolution"] == 64
    for name in ("ssdd-student", "ssdd-teacher"):
        r = rows[name]
        assert all(k in r for k in ("name", "img_per_s", "gflop_per_img", "achieved_gflops", "fraction_of_peak",
                                    "speed_vs_student", "passes_per_image", "params_M"))
        assert r["img_per_s"] > 0 and r["family"] == "ssdd" and name in stdout.getvalue()
    n = load_config("ssdd-tiny-64").model.ssdd.steps
    assert rows["ssdd-student"]["passes_per_image"] == 1 and rows["ssdd-teacher"]["passes_per_image"] == n
    # gflop_per_img against a count of the timed decode: tests/test_flops.py::test_bench_ssdd_rows_count_what_they_time
