"""Stage-2 distillation: the student pass, targets, adaptive weight, discriminators, training, resume."""

import pytest
import torch
import torch.nn.functional as F

from msdd.models.discriminator import PatchDiscriminator, build_discriminator, hinge_d_loss
from msdd.tokenizer import Tokenizer
from msdd.train.distill import Distiller, adaptive_weight, student_pass, teacher_targets
from msdd.train.stage1 import Stage1Trainer

from conftest import tiny_config


class CountingDecoder(torch.nn.Module):
    """Wraps a real decoder and counts its forward calls."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder, self.calls = decoder, 0

    def forward(self, x, tau, z):
        self.calls += 1
        return self.decoder(x, tau, z)

    def null_like(self, z):
        return self.decoder.null_like(z)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    Stage1Trainer(tiny_config("train.ckpt_every=1000"), run).fit(max_steps=60, progress=False)
    return run / "model"


def test_student_pass_makes_one_call_per_stage_and_keeps_every_stage():
    tok = Tokenizer(tiny_config(stages=4, ).model)
    counting = CountingDecoder(tok.decoder)
    z = torch.randn(2, 8, 4)
    x, stages, noises = student_pass(counting, z, tok.windows, 1 / 3, torch.Generator().manual_seed(0))
    assert counting.calls == 4
    assert [n.shape for n in noises] == [s.shape for s in stages]
    assert [s.shape[-1] for s in stages] == [4, 8, 16, 32] and x.shape == (2, 3, 32, 32)


def test_gradients_reach_the_student_only(teacher_dir, tmp_path):
    d = Distiller(tiny_config("distill.batch_size=4"), teacher_dir, tmp_path / "d")
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    enc_before = {k: v.clone() for k, v in d.student.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in d.student.decoder.state_dict().items()}
    out = d.train_step(images)
    assert out is not None and torch.isfinite(torch.tensor(out["loss"]))
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert all(torch.equal(enc_before[k], v) for k, v in d.student.encoder.state_dict().items())
    assert any(not torch.equal(dec_before[k], v) for k, v in d.student.decoder.state_dict().items())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.student.encoder.parameters())


def test_teacher_target_starts_in_the_stage_of_u(teacher_dir):
    tok = Tokenizer.from_pretrained(teacher_dir)
    w = tok.windows
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 8, 4)
    for win in w:
        u = (win.tau_start + win.tau_end) / 2
        s_u, outs, _ = teacher_targets(tok.decoder, x, z, w, u, 1, 1.0, 1 / 3, torch.Generator().manual_seed(0))
        assert s_u == win.index
        assert len(outs) == len(w) - s_u
        assert [o.shape[-1] for o in outs] == [v.resolution for v in w[s_u:]]


def test_adaptive_weight_is_finite_and_clamped():
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    rec = (x @ w).pow(2).mean()
    adv = (x @ w).sum() * 1e-12  # tiny adversarial gradient -> huge ratio -> clamped
    lam = adaptive_weight(rec, adv, w)
    assert torch.isfinite(lam) and 0 <= lam.item() <= 1e4
    lam0 = adaptive_weight(rec, (x @ w).detach().sum() * 0 + (w * 0).sum(), w)  # zero adversarial gradient
    assert torch.isfinite(lam0) and lam0.item() <= 1e4


def test_patch_discriminator_learns_real_vs_blurred():
    """Real embedded crops vs the same crops blurred: hinge training separates them (can fail)."""
    from msdd.data import EmbeddedCrops

    torch.manual_seed(0)
    ds = EmbeddedCrops(32, length=64, seed=0)
    real = torch.stack([ds[i][0] for i in range(64)])
    blurred = F.interpolate(F.avg_pool2d(real, 4), scale_factor=4, mode="bilinear")
    disc = PatchDiscriminator(channels=16)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9))
    for _ in range(150):
        loss = hinge_d_loss(disc(real[:48]), disc(blurred[:48]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # held-out crops
        r, f = disc(real[48:]).mean(1), disc(blurred[48:]).mean(1)
    assert (r > f).float().mean() > 0.9


def test_distillation_reduces_student_teacher_gap(teacher_dir, tmp_path):
    """A few hundred steps reduce the MSE between student (1 step/stage) and teacher decodes."""
    cfg = tiny_config("distill.batch_size=8", "distill.lambda_adv=0", "distill.lr=1e-3", "distill.warmup_steps=10",
                      "distill.max_steps=200", "distill.log_every=1000", "distill.ckpt_every=1000",
                      "distill.grid_every=1000")
    d = Distiller(cfg, teacher_dir, tmp_path / "d")
    from msdd.data import embedded_eval_set
    from msdd.flow.sampler import sample

    images = embedded_eval_set(32)[0][:12]

    def gap(student_decoder):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        with torch.no_grad():
            z = d.teacher.encoder(images)
            t = sample(d.teacher.decoder, z, d.teacher.windows, [1, 1, 1], generator=g1)
            s = sample(student_decoder, z, d.teacher.windows, [1, 1, 1], generator=g2)
        return F.mse_loss(s, t).item(), F.mse_loss(s, images).item()

    before = gap(d.student.decoder)
    d.fit(progress=False)
    after = gap(d.student.decoder)
    assert after[1] < before[1], (before, after)  # student closer to the real images
    assert (tmp_path / "d" / "model" / "model.safetensors").exists()
    student = Tokenizer.from_pretrained(tmp_path / "d" / "model")
    assert student.config.one_step and student.default_steps() == (1, 1, 1)


def test_distill_resume(teacher_dir, tmp_path):
    cfg = tiny_config("distill.batch_size=4", "distill.ckpt_every=3")
    Distiller(cfg, teacher_dir, tmp_path / "d").fit(max_steps=3, progress=False)
    d = Distiller(cfg, teacher_dir, tmp_path / "d", require_resume=True)
    assert d.step == 3
    d.fit(max_steps=5, progress=False)
    assert d.step == 5
    with pytest.raises(ValueError, match="distill.lambda_perc"):
        Distiller(tiny_config("distill.batch_size=4", "distill.ckpt_every=3", "distill.lambda_perc=0.7"),
                  teacher_dir, tmp_path / "d")


def test_missing_pretrained_files_name_file_and_option(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf"))
    monkeypatch.delenv("MSDD_DINO_WEIGHTS", raising=False)
    monkeypatch.delenv("MSDD_VGG16_WEIGHTS", raising=False)
    pytest.importorskip("timm")
    with pytest.raises(FileNotFoundError, match=r"dino_deitsmall16_pretrain\.pth.*--dino-weights"):
        build_discriminator("dino")
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth[\s\S]*--vgg-weights[\s\S]*distill\.perceptual"):
        Distiller(tiny_config("distill.perceptual=lpips", "distill.lambda_perc=0.5"), teacher_dir, tmp_path / "x")


def test_dino_discriminator_with_a_weights_file(tmp_path):
    """The DINO path end to end with a real ViT-S/16 state dict file (randomly initialised: the test
    checks loading, the feature levels and where gradients go, not DINO's features)."""
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit.state_dict(), path)
    disc = build_discriminator("dino", path)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    feats = disc.features(x)
    assert len(feats) == 5 and all(f.shape == (2, 196, 384) for f in feats)
    logits = disc(x)
    assert logits.shape == (2, 5 * 196)
    logits.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.vit.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
