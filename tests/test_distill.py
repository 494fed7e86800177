"""Stage-2 distillation: the student pass, targets, adaptive weight, discriminators, training, resume."""

import pytest
import torch
import torch.nn.functional as F

from msdd.flow.schedule import stage_of_tau
from msdd.models.discriminator import (
    IMAGENET_MEAN, IMAGENET_STD, PatchDiscriminator, build_discriminator, hinge_d_loss, hinge_g_loss,
)  # fmt: skip
from msdd.tokenizer import Tokenizer
from msdd.train.distill import Distiller, adaptive_loss, adaptive_weight, student_pass, teacher_targets
from msdd.train.ema import EMA
from msdd.train.stage1 import Stage1Trainer

from conftest import (
    assert_grid_shows, assert_same_runs, assert_same_weights, random_vgg16_file, straight_and_resumed, tiny_config,
)  # fmt: skip


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


class RecordingDecoder(CountingDecoder):
    """A counting decoder that also keeps the batch size and the latents of every call."""

    def __init__(self, decoder):
        super().__init__(decoder)
        self.seen = []

    def forward(self, x, tau, z):
        self.seen.append((x.shape[0], z.clone()))
        return super().forward(x, tau, z)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    Stage1Trainer(tiny_config("train.ckpt_every=1000"), run).fit(max_steps=60, progress=False)
    return run / "model"


def test_student_pass_makes_one_call_per_stage_and_keeps_every_stage():
    tok = Tokenizer(tiny_config(stages=4, ).model)
    counting = CountingDecoder(tok.decoder)
    z = torch.randn(2, 8, 4)
    x, stages, noises = student_pass(counting, z, tok.windows, torch.Generator().manual_seed(0))
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
        s_u, outs, _ = teacher_targets(tok.decoder, x, z, w, u, 1, 1.0, torch.Generator().manual_seed(0))
        assert s_u == win.index
        assert len(outs) == len(w) - s_u
        assert [o.shape[-1] for o in outs] == [v.resolution for v in w[s_u:]]


def test_teacher_targets_use_their_guidance(teacher_dir):
    """distill.cfg reaches the teacher: at guidance 2 every teacher pass is one doubled batch whose second half
    holds the null context (classifier-free guidance), and the targets differ from the unguided ones; at
    guidance 1 every pass is the conditional batch alone."""
    tok = Tokenizer.from_pretrained(teacher_dir)
    w = tok.windows
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 8, 4)
    outs = {}
    for guidance in (1.0, 2.0):
        rec = RecordingDecoder(tok.decoder)
        s_u, outs[guidance], _ = teacher_targets(rec, x, z, w, 0.5, 2, guidance, torch.Generator().manual_seed(0))
        assert rec.calls == 2 * (len(w) - s_u) and len(rec.seen) == rec.calls  # 2 steps per stage s_u..S-1
        for batch, seen_z in rec.seen:
            if guidance == 1.0:
                assert batch == 2 and torch.equal(seen_z, z)
            else:
                assert batch == 4 and torch.equal(seen_z[:2], z)
                assert torch.equal(seen_z[2:], tok.decoder.null_like(z))
    assert not torch.allclose(outs[1.0][-1], outs[2.0][-1])


def test_l_rec_compares_the_signals_of_the_two_chains(teacher_dir, tmp_path):
    """micro_step's logged L_rec (and its per-stage gaps) is the sum over s >= s_u of
    MSE(x_s - e_s N_s, t_s - e_s N'_s): each stage output less the unit noise its chain carries, recomputed
    here from the same draws (u, the student chain, the teacher's continuation). Comparing the raw outputs
    instead adds the two chains' independent noise (about 2 e_s^2 per stage)."""
    d = Distiller(tiny_config("distill.batch_size=4", "train.bf16=false"), teacher_dir, tmp_path / "d")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    logs = d.micro_step(images, torch.Generator().manual_seed(5))[1]
    g, w, dc = torch.Generator().manual_seed(5), d.student.windows, d.cfg.distill
    with torch.no_grad():
        z = d.teacher.encoder(images).float()
        u = torch.rand((), generator=g).item()
        x, stages_s, noise_s = student_pass(d.student.decoder, z, w, g)
        s_u, stages_t, noise_t = teacher_targets(d.teacher.decoder, x, z, w, u, dc.teacher_steps, dc.cfg, g)
    assert logs["u"] == u and s_u == stage_of_tau(w, u) == 0  # every stage in L_rec, all but the last noisy
    gaps = {s: F.mse_loss(stages_s[s] - w[s].t_end * noise_s[s], t - w[s].t_end * n).item()
            for s, t, n in zip(range(s_u, len(w)), stages_t, noise_t)}
    raw = sum(F.mse_loss(stages_s[s], t).item() for s, t in zip(range(s_u, len(w)), stages_t))
    assert {k: v for k, v in logs.items() if k.startswith("gap_stage")} == pytest.approx(
        {f"gap_stage{s}": v for s, v in gaps.items()}, rel=1e-4)
    assert logs["l_rec"] == pytest.approx(sum(gaps.values()), rel=1e-4)
    assert raw > 2 * logs["l_rec"]  # the noise floor the comparison removes: the test can tell the two apart


def test_adaptive_weight_is_the_gradient_norm_ratio_and_clamped():
    """lambda = |d rec / dW| / (|d adv / dW| + 1e-4), from gradients computed by hand (not autograd)."""
    w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    # rec = mean((x W)^2) over 3 x 4 entries -> d rec / dW = 2 x^T (x W) / 12
    # adv = c sum(x W)                      -> d adv / dW = c x^T 1, i.e. [i, j] = c sum_b x[b, i]
    g_rec = 2 * x.T @ (x @ w.detach()) / 12
    g_adv_unit = x.sum(0)[:, None].expand(4, 4)

    def rec():
        return (x @ w).pow(2).mean()

    for c in (0.5, 3.0):  # ratios well inside [0, 1e4]: the value itself
        lam = adaptive_weight(rec(), c * (x @ w).sum(), w)
        expected = g_rec.norm() / (c * g_adv_unit.norm() + 1e-4)
        assert 0 < expected.item() < 1e4
        assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
        assert not lam.requires_grad  # a weight, not a path for gradients
    # a larger non-adversarial gradient scales the weight up by the same factor
    assert adaptive_weight(10 * rec(), (x @ w).sum(), w).item() == pytest.approx(
        10 * g_rec.norm().item() / (g_adv_unit.norm().item() + 1e-4), rel=1e-5)
    # tiny adversarial gradient -> ratio far above 1e4 -> exactly the clamp
    huge = g_rec.norm() / (1e-12 * g_adv_unit.norm() + 1e-4)
    assert huge.item() > 1e4
    assert adaptive_weight(rec(), (x @ w).sum() * 1e-12, w).item() == 1e4
    # zero adversarial gradient: finite (the 1e-4 floor), clamped
    assert adaptive_weight(rec(), (w * 0).sum(), w).item() == 1e4
    # a NaN non-adversarial gradient (a bf16 overflow upstream) gives 0, never NaN into the loss
    assert adaptive_weight((x @ w).sum() * float("nan"), (x @ w).sum(), w).item() == 0.0


def test_adaptive_loss_gives_the_three_pass_gradients_in_two():
    """`adaptive_loss` (two full backward passes) against the definition (lam from two passes to the last layer,
    then a backward pass through non_adv + lam adv), float64: the value, lam and every parameter's gradient, the
    last layer used twice (as at every stage of a decode), parameters that only non_adv or only adv reaches, one
    that nothing reaches, and the loop's scaling of the loss by a micro-batch's share."""
    g = torch.Generator().manual_seed(0)
    w, v, only_rec, only_adv, unused = (torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
                                        for shape in ((4, 4), (4, 4), (4,), (2,), (3,)))
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    params = [v, w, only_rec, only_adv, unused]

    def losses():
        h = torch.tanh(x @ w) @ v @ w  # w first and last
        return (h - 0.3).pow(2).mean() + only_rec.pow(2).sum(), h.sin().sum() + only_adv.pow(2).sum()

    non_adv, adv = losses()
    lam_ref = adaptive_weight(non_adv, adv, w) * 0.7
    (non_adv + lam_ref * adv).backward()
    expected = [None if p.grad is None else p.grad.clone() for p in params]
    assert None not in expected[:4] and expected[4] is None
    for p in params:
        p.grad = None
    non_adv, adv = losses()
    lam, loss = adaptive_loss(non_adv, adv, params, w, 0.7)
    assert lam.item() == pytest.approx(lam_ref.item(), rel=1e-12) and 0 < lam.item() < 1e4
    assert loss.item() == pytest.approx((non_adv + lam_ref * adv).item(), rel=1e-12)
    (loss * 0.25).backward()
    assert unused.grad is None
    for p, e in zip(params[:4], expected):
        torch.testing.assert_close(p.grad, 0.25 * e, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_distill_compile_runs_the_students_blocks_compiled_with_the_eager_loss_and_gradients(teacher_dir, tmp_path,
                                                                                              monkeypatch):
    """distill.compile: the student decoder's transformer blocks run compiled (not its frozen encoder's, not the
    EMA's or the teacher's), and a compiled step, whose adaptive weight takes two backward passes through them (the
    first keeping the graph, which AOTAutograd's donated buffers would refuse), gives the eager step's loss, weight
    and gradients (float32). Backend aot_eager: autograd's tracing of the blocks without inductor's code generation."""
    import torch._functorch.config

    import msdd.train.distiller as distiller
    from msdd.models import compiling
    from msdd.models.layers import JointBlock

    calls = []

    def compile_blocks(model, device, **options):
        calls.append((model, options))
        return compiling.compile_blocks(model, device, backend="aot_eager", **options)

    monkeypatch.setattr(distiller, "compile_blocks", compile_blocks)
    settings = ("distill.batch_size=4", "train.bf16=false")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses, logs, grads = [], [], []
    # PyTorch's default, whatever ran before; restored after (torch's own patch: monkeypatch's undo would delete it)
    with torch._functorch.config.patch(donated_buffer=True):
        eager = Distiller(tiny_config(*settings), teacher_dir, tmp_path / "eager")
        compiled = Distiller(tiny_config(*settings, "distill.compile=true"), teacher_dir, tmp_path / "compiled")
        for d in (eager, compiled):
            loss, out = d.micro_step(images, torch.Generator().manual_seed(5))
            loss.backward()
            losses.append(loss.item())
            logs.append(out)
            grads.append([p.grad for p in d.trained_parameters()])
    assert calls == [(compiled.student.decoder, {"setting": "distill.compile", "keep_graph": True})]
    blocks = [m for m in compiled.student.decoder.modules() if isinstance(m, JointBlock)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)  # what nn.Module.compile sets
    for frozen in (compiled.student.encoder, compiled.ema.module, compiled.teacher):
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in frozen.modules())
    assert 0 < logs[0]["lambda_adv"] < 1e4  # the adaptive weight, not its clamp
    assert logs[1]["lambda_adv"] == pytest.approx(logs[0]["lambda_adv"], rel=1e-4)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert [g is None for g in grads[1]] == [g is None for g in grads[0]]  # the null context: no gradient here
    assert sum(g is not None for g in grads[1]) > 0.9 * len(grads[1])
    for ge, gc in zip(*grads):
        if ge is not None:
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


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
    """The student-teacher gap the distillation defines (SPEC 7: the sum over stages s >= s_u of the MSE
    between the signal of the student's stage output and that of the teacher's continuation from the
    student's image noised at u), on held-out photos with fixed noise and u in every stage: distilling
    with teacher targets only (no pixel or adversarial loss) must shrink it."""
    cfg = tiny_config("distill.batch_size=4", "distill.lambda_adv=0", "distill.lambda_pix=0", "distill.lr=1e-3",
                      "distill.warmup_steps=10", "distill.max_steps=50", "distill.log_every=1000",
                      "distill.ckpt_every=1000", "distill.grid_every=1000")
    d = Distiller(cfg, teacher_dir, tmp_path / "d")
    from msdd.data import embedded_eval_set

    def without_noise(x, noise, win):  # a stage output less the unit noise its chain carries, e_s N_s
        return x.float() - win.t_end * noise.float()

    images = embedded_eval_set(32)[0][:12]  # held-out photos, never training crops
    w, dc = d.teacher.windows, cfg.distill
    us = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert {win.index for win in w} == {stage_of_tau(w, u) for u in us}  # every stage starts a target

    def gap(student_decoder):
        total = 0.0
        with torch.no_grad():
            z = d.teacher.encoder(images)
            for k, u in enumerate(us):
                g = torch.Generator().manual_seed(100 + k)
                x, stages_s, noise_s = student_pass(student_decoder, z, w, g)
                s_u, stages_t, noise_t = teacher_targets(d.teacher.decoder, x, z, w, u, dc.teacher_steps, dc.cfg, g)
                total += sum(F.mse_loss(without_noise(stages_s[stage], noise_s[stage], w[stage]),
                                        without_noise(t, n, w[stage])).item()
                             for stage, t, n in zip(range(s_u, len(w)), stages_t, noise_t))
        return total

    before = gap(d.student.decoder)  # the student starts as the teacher's weights
    d.fit(progress=False)
    student = Tokenizer.from_pretrained(tmp_path / "d" / "model")  # the saved (EMA) student
    after = gap(student.decoder)
    assert after < 0.75 * before, (before, after)  # measured: 0.055 -> 0.031
    assert student.config.one_step and student.default_steps() == (1, 1, 1)


def test_distill_resume(teacher_dir, tmp_path):
    cfg = tiny_config("distill.batch_size=4", "distill.ckpt_every=3")
    Distiller(cfg, teacher_dir, tmp_path / "d").fit(max_steps=3, progress=False)
    d = Distiller(cfg, teacher_dir, tmp_path / "d", require_resume=True)
    assert d.step == 3
    d.fit(max_steps=5, progress=False)
    assert d.step == 5
    from msdd.config import to_dict
    from msdd.hub import file_sha256

    saved = Tokenizer.from_pretrained(tmp_path / "d" / "model")  # the EMA student and its training record
    assert saved.config.one_step and saved.config == d.ema.module.config
    assert_same_weights(saved, d.ema.module)
    assert {k: saved.metadata[k] for k in ("stage", "steps_trained", "teacher_sha256", "distill")} == {
        "stage": 2, "steps_trained": 5, "teacher_sha256": file_sha256(teacher_dir / "model.safetensors"),
        "distill": to_dict(cfg.distill)}
    with pytest.raises(ValueError, match="distill.lambda_perc"):
        Distiller(tiny_config("distill.batch_size=4", "distill.ckpt_every=3", "distill.lambda_perc=0.7"),
                  teacher_dir, tmp_path / "d")


def test_distill_resume_continues_exactly(teacher_dir, tmp_path):
    """4 steps in one run equal 2 steps, a resume from their checkpoint and 2 more: the same logged losses, and
    the same student, EMA (its update count: the warm-up ramp) and discriminator (its weights, its optimiser's
    state), so a resumed distillation trains as if it had never stopped."""
    cfg = tiny_config("distill.batch_size=2", "distill.ckpt_every=2", "distill.log_every=1",
                      "distill.adv_start_step=0", "distill.grid_every=1000")
    resumed_at = []

    def make(run, require_resume):
        d = Distiller(cfg, teacher_dir, run, require_resume=require_resume)
        resumed_at.append(d.ema.updates)
        return d

    straight, resumed = straight_and_resumed(make, tmp_path)
    assert resumed_at[-1] == 2  # the EMA's update count came back with the checkpoint

    assert len(open(tmp_path / "a" / "log.jsonl").readlines()) == 4
    assert_same_runs(tmp_path / "a", tmp_path / "b",
                     ("l_gen", "l_rec", "l_adv", "lambda_adv", "d_loss", "d_real", "d_fake", "u", "grad_norm", "lr"),
                     {"student": (straight.student, resumed.student), "ema": (straight.ema.module, resumed.ema.module),
                      "discriminator": (straight.disc, resumed.disc)})


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


def test_hinge_losses_against_hand_values():
    """The discriminator's hinge loss is mean relu(1 - real) + mean relu(1 + fake): it pushes real logits above 1
    and fake ones below -1, and logits already past their margin cost nothing; the generator's is -mean(fake)."""
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx((0 + 1) / 2 + (0 + 1) / 2)
    assert hinge_d_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(0.5 + 1.5)
    assert hinge_g_loss(torch.tensor([0.5, -1.5])).item() == pytest.approx(0.5)


def test_dino_discriminator_sees_imagenet_normalised_pixels(tmp_path):
    """DINO was trained on ImageNet-normalised [0, 1] pixels: the features of images x in [-1, 1] are the ViT's of
    ((x + 1) / 2 - mean) / std resized to 224 px (feeding [-1, 1] as it is gives the ViT images it never saw)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit.state_dict(), path)
    disc = build_discriminator("dino", path).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(((images + 1) / 2 - mean) / std, size=(224, 224), mode="bilinear", align_corners=False,
                      antialias=True)
    with torch.no_grad():
        expected = vit.patch_embed(x) + vit.pos_embed[:, vit.num_prefix_tokens:]  # the first level: patch tokens
        got = disc.features(images)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _step_by_hand(d, images, seed: int) -> dict:
    """The generator terms of `d.micro_step(images, Generator().manual_seed(seed))`, recomputed from the same draws
    with their graphs: u, the student's image, L_rec, L_pix, L_adv (and L_perc when the distiller has LPIPS)."""
    g, w, dc = torch.Generator().manual_seed(seed), d.student.windows, d.cfg.distill
    with torch.no_grad():
        z = d.teacher.encoder(images).float()
    u = torch.rand((), generator=g).item()
    x, stages_s, noise_s = student_pass(d.student.decoder, z, w, g)
    s_u, stages_t, noise_t = teacher_targets(d.teacher.decoder, x, z, w, u, dc.teacher_steps, dc.cfg, g)
    l_rec = sum(F.mse_loss(stages_s[s] - w[s].t_end * noise_s[s], t - w[s].t_end * n)
                for s, t, n in zip(range(s_u, len(w)), stages_t, noise_t))
    terms = {"u": u, "x": x, "l_rec": l_rec, "l_pix": F.mse_loss(x, images), "l_adv": hinge_g_loss(d.disc(x))}
    if d.perceptual is not None:
        terms["l_perc"] = d.perceptual(x, images).mean()
    return terms


def _distiller(teacher_dir, run, *settings, vgg_weights=None):
    """A tiny fp32 distiller whose discriminator is in eval mode: its spectral norms then stay put between calls, so
    that a step redone by hand sees the same discriminator."""
    d = Distiller(tiny_config("distill.batch_size=4", "train.bf16=false", *settings), teacher_dir, run,
                  vgg_weights=vgg_weights)
    d.disc.eval()
    return d


LPIPS_ON = ("distill.perceptual=lpips", "distill.lambda_perc=0.5")  # with a random VGG16 file


@pytest.mark.parametrize("settings, weight", [
    ((), "total"),  # tiny-64's: adaptive against lambda_rec (L_rec / (1 + u) + lambda_pix L_pix)
    (("distill.adaptive_of=reference",), "reference"),  # adaptive against L_rec + lambda_pix L_pix
    ((*LPIPS_ON, "distill.adaptive_of=reference"), "reference"),  # ... + lambda_perc L_perc
    (("distill.adaptive_adv=false",), "fixed"),  # lambda_adv itself
    (("distill.lambda_adv=0",), "none"),  # no adversarial term, no discriminator pass on the student's image
    (("distill.lambda_pix=0",), "total"),  # no pixel term
    (("distill.cfg=2", "distill.teacher_steps=2"), "total"),  # the teacher's targets: guided, two steps a stage
])
def test_the_generator_loss_is_its_terms_weighted_and_gives_their_gradients(teacher_dir, tmp_path, settings, weight):
    """micro_step's generator loss, term by term against the step redone by hand from the same draws:
    lambda_rec (L_rec / (1 + u) + lambda_pix L_pix + lambda_perc L_perc) + lambda_adv' L_adv, with lambda_adv' =
    lambda_adv times the adaptive weight (of that term, or of the reference's L_rec + lambda_pix L_pix + lambda_perc
    L_perc) or lambda_adv itself; the returned loss is it plus the discriminator's, and its gradients reach the
    student as those of the generator loss alone."""
    vgg = random_vgg16_file(tmp_path / "vgg16.pth") if "distill.perceptual=lpips" in settings else None
    d = _distiller(teacher_dir, tmp_path / "d", "distill.lambda_adv=0.5", "distill.lambda_rec=2", *settings,
                   vgg_weights=vgg)
    dc = d.cfg.distill
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    total, logs = d.micro_step(images, torch.Generator().manual_seed(5))
    h = _step_by_hand(d, images, 5)
    assert logs["u"] == h["u"] and logs["l_rec"] == pytest.approx(h["l_rec"].item(), rel=1e-5)
    tie = dc.lambda_pix * h["l_pix"]  # the terms beside L_rec
    for name, lam_ in (("l_pix", dc.lambda_pix), ("l_perc", dc.lambda_perc if vgg else 0)):
        assert (name in logs) == (lam_ > 0)
        if lam_ > 0:
            assert logs[name] == pytest.approx(h[name].item(), rel=1e-5)
    if vgg:
        assert h["l_perc"].item() > 0  # (a zero term would hide how it is reduced and signed)
        tie = tie + dc.lambda_perc * h["l_perc"]
    non_adv = dc.lambda_rec * (h["l_rec"] / (1 + h["u"]) + tie)
    last = d.student.decoder.final.linear.weight
    lam = {"total": lambda: adaptive_weight(non_adv, h["l_adv"], last) * dc.lambda_adv,
           "reference": lambda: adaptive_weight(h["l_rec"] + tie, h["l_adv"], last) * dc.lambda_adv,
           "fixed": lambda: torch.tensor(dc.lambda_adv), "none": lambda: torch.tensor(0.0)}[weight]().item()
    assert logs["lambda_adv"] == pytest.approx(lam, rel=1e-4) and (lam > 0) == (weight != "none")
    assert logs["l_adv"] == (0.0 if weight == "none" else pytest.approx(h["l_adv"].item(), rel=1e-5))
    l_gen = non_adv + lam * h["l_adv"]  # lam is 0 without the adversarial term
    assert logs["l_gen"] == pytest.approx(l_gen.item(), rel=1e-5)
    assert total.item() == pytest.approx(logs["l_gen"] + logs["d_loss"], rel=1e-5)
    params = [p for p in d.student.decoder.parameters() if p.requires_grad]
    got = torch.autograd.grad(total, params, allow_unused=True)
    want = torch.autograd.grad(l_gen, params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_discriminator_learns_from_its_own_loss_only(teacher_dir, tmp_path):
    """The discriminator is frozen while the generator loss is built: the step's gradients reach it as those of the
    hinge loss on the real images and the detached student image, and no part of the generator's (here the fixed
    weight's sum, which would pass L_adv's gradient to any discriminator parameter left trainable)."""
    d = _distiller(teacher_dir, tmp_path / "d", "distill.adaptive_adv=false")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    total, logs = d.micro_step(images, torch.Generator().manual_seed(5))
    x = _step_by_hand(d, images, 5)["x"].detach()
    d_loss = hinge_d_loss(d.disc(images), d.disc(x))
    assert logs["d_loss"] == pytest.approx(d_loss.item(), rel=1e-5) and logs["l_adv"] != 0
    got = torch.autograd.grad(total, d.disc_params)
    for a, b in zip(got, torch.autograd.grad(d_loss, d.disc_params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_reference_optimiser_options(teacher_dir, tmp_path):
    """Issue 15 D12: lr and disc_lr scaled by batch / lr_reference_batch; discriminator gradients clipped (and the
    student's, by train.grad_clip)."""
    base = tiny_config("distill.batch_size=4")
    d = Distiller(tiny_config("distill.batch_size=4", "distill.lr_reference_batch=16", "distill.disc_grad_clip=0.001",
                              "train.grad_clip=0.002"), teacher_dir, tmp_path / "d")
    assert d.opt.param_groups[0]["initial_lr"] == pytest.approx(base.distill.lr * 4 / 16)
    assert d.disc is not None and d.opt_d.param_groups[0]["initial_lr"] == pytest.approx(base.distill.disc_lr * 4 / 16)
    out = d.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    clipped = torch.norm(torch.stack([p.grad.norm() for p in d.disc_params if p.grad is not None]))
    assert out["disc_grad_norm"] > 0.001 and clipped.item() == pytest.approx(0.001, rel=1e-3)
    student = torch.norm(torch.stack([p.grad.norm() for p in d.student.decoder.parameters() if p.grad is not None]))
    assert out["grad_norm"] > 0.002 and student.item() == pytest.approx(0.002, rel=1e-3)  # train.grad_clip
    plain = Distiller(base, teacher_dir, tmp_path / "p")  # disc_grad_clip=0: the discriminator's gradients unclipped
    assert plain.opt.param_groups[0]["initial_lr"] == pytest.approx(base.distill.lr)
    assert "disc_grad_norm" not in plain.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    unclipped = torch.norm(torch.stack([p.grad.norm() for p in plain.disc_params if p.grad is not None]))
    assert unclipped.item() > 0.01  # was clipped to 0 with `disc_grad_clip >= 0`: a discriminator that never learns


def test_the_distillation_grid_shows_real_teacher_student_and_four_times_the_error(teacher_dir, tmp_path):
    d = Distiller(tiny_config(), teacher_dir, tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    teacher = torch.rand(2, 3, 32, 32, generator=g) * 3 - 1.5  # beyond [-1, 1]: clamped in the grid
    student = images + (torch.rand(2, 3, 32, 32, generator=g) - 0.5) * 0.6
    assert_grid_shows(d.write_grid(images, teacher, student), [images, teacher.clamp(-1, 1), student.clamp(-1, 1),
                      ((student - images).abs() * 4 - 1).clamp(-1, 1)], 32)


def test_stage2_ema_from_the_first_step(teacher_dir, tmp_path):
    """D12: with `distill.ema_warmup` false the EMA uses `ema_decay` from the first update, as the reference's
    stage 2 (paper-256): the starting weights keep decay**n. The default ramp takes min(decay, (1+n)/(10+n))."""
    start, target = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    start.weight.data.fill_(1.0)
    target.weight.data.fill_(0.0)
    plain, ramped = EMA(start, 0.99, warmup=False), EMA(start, 0.99)
    for _ in range(20):
        plain.update(target)
        ramped.update(target)
    assert plain.module.weight.item() == pytest.approx(0.99 ** 20)
    ramp = 1.0
    for n in range(1, 21):
        ramp *= min(0.99, (1 + n) / (10 + n))
    assert ramped.module.weight.item() == pytest.approx(ramp)
    d = Distiller(tiny_config("distill.batch_size=4", "distill.ema_warmup=false"), teacher_dir, tmp_path / "d")
    assert d.ema.warmup is False
    assert Distiller(tiny_config("distill.batch_size=4"), teacher_dir, tmp_path / "r").ema.warmup


def test_adaptive_weight_against_the_reference_term(teacher_dir, tmp_path):
    """Issue 15 D6: `adaptive_of=reference` balances against L_rec (here no pixel or LPIPS term), ours
    against lambda_rec * L_rec / (1 + u): the two weights differ by exactly lambda_rec / (1 + u)."""
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    logs = {}
    for mode in ("total", "reference"):
        d = Distiller(tiny_config("distill.batch_size=4", "distill.lambda_pix=0", "distill.perceptual=none",
                                  f"distill.adaptive_of={mode}"), teacher_dir, tmp_path / mode)
        logs[mode] = d.micro_step(images, torch.Generator().manual_seed(3))[1]
    total, ref = logs["total"], logs["reference"]
    assert total["u"] == ref["u"] and total["l_rec"] == ref["l_rec"] and ref["lambda_adv"] > 0
    lam_rec = tiny_config().distill.lambda_rec
    assert total["lambda_adv"] / ref["lambda_adv"] == pytest.approx(lam_rec / (1 + total["u"]), rel=1e-3)  # fp32 grads


def test_student_sees_the_null_context(teacher_dir, tmp_path, monkeypatch):
    """Issue 15 D11: with student_cfg_drop the student's (and teacher's) latents pass through drop_context."""
    import msdd.train.distill as distill_module

    seen = []
    real = distill_module.drop_context
    monkeypatch.setattr(distill_module, "drop_context", lambda *a: seen.append(a[2]) or real(*a))
    d = Distiller(tiny_config("distill.batch_size=4", "distill.student_cfg_drop=0.5"), teacher_dir, tmp_path / "d")
    d.micro_step(torch.rand(4, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    assert seen == [0.5]
    d = Distiller(tiny_config("distill.batch_size=4"), teacher_dir, tmp_path / "e")
    d.micro_step(torch.rand(4, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    assert seen == [0.5]  # off by default


def test_reference_dino_heads(tmp_path):
    """Issue 15 D7: the reference code's heads, 384 wide: 5 x (384 x 384 + 384 (1x1 in) + 768 (BatchNorm)
    + 384 x 384 x 9 + 384 (kernel-9 residual) + 385 (1x1 out)) = 7,382,405 trainable parameters (ours: 986,245);
    the CLS token is added to every patch token; training-mode inputs are randomly cropped."""
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit.state_dict(), path)
    ref, small = build_discriminator("dino", path, reference_heads=True), build_discriminator("dino", path)
    count = lambda d: sum(p.numel() for p in d.heads.parameters())  # noqa: E731
    assert count(ref) == 7_382_405 and count(small) == 986_245
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        f_ref, f_small = ref.features(x), small.features(x)
        h = ref.vit._pos_embed(ref.vit.patch_embed(torch.nn.functional.interpolate(
            ((x + 1) / 2 - ref.mean) / ref.std, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)))
        assert torch.allclose(f_ref[0] - f_small[0], h[:, :1].expand_as(f_ref[0]), atol=1e-5)
        torch.manual_seed(0)
        ref.train()
        train_logits = ref(x)
        ref.eval()
        assert train_logits.shape == ref(x).shape == (2, 5 * 196)
    from msdd.models.discriminator import random_crops

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(64, 3, 32, 32)
    assert torch.equal(random_crops(imgs, 0.0, g), imgs)
    changed = (random_crops(imgs, 0.5, g) != imgs).flatten(1).any(1)
    assert changed.shape == (64,) and 16 <= changed.sum().item() <= 48  # about half the images


def test_the_distillers_networks_follow_its_config(teacher_dir, tmp_path):
    """What a distiller builds and what it trains: the teacher frozen in eval mode, the student's encoder frozen and
    its decoder trained; a DINO discriminator with the heads `distill.disc_heads` names, of which only the heads
    train, its weights file used without a warning; no LPIPS network (and no VGG16 file asked for) when
    `distill.lambda_perc` is 0, a VGG16 file given then reported unused."""
    import warnings

    timm = pytest.importorskip("timm")
    dino = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict(), dino)
    vgg = tmp_path / "vgg16.pth"  # never opened: LPIPS is off
    for heads in ("small", "reference"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            d = Distiller(tiny_config("distill.discriminator=dino", f"distill.disc_heads={heads}",
                                      "distill.perceptual=lpips", "distill.lambda_perc=0"),
                          teacher_dir, tmp_path / heads, dino_weights=dino, vgg_weights=vgg)
        said = [str(w.message) for w in record if " is not used" in str(w.message)]
        assert said == [f"--vgg-weights {vgg} is not used: distill.lambda_perc=0 (no LPIPS loss)"]
        assert d.perceptual is None
        assert not any(p.requires_grad for p in d.teacher.parameters()) and not d.teacher.training
        assert not any(p.requires_grad for p in d.student.encoder.parameters())
        assert all(p.requires_grad for p in d.student.decoder.parameters())
        assert d.disc.reference == (heads == "reference")
        assert [id(p) for p in d.disc_params] == [id(p) for p in d.disc.heads.parameters()]  # not the frozen ViT
        assert not any(p.requires_grad for p in d.disc.vit.parameters())


def test_a_guided_teachers_student_decodes_unguided(tmp_path):
    """The teacher's stored schedule may guide (model.sampling.cfg 2: two passes a step); its student learns the guided
    decode in one pass a stage, so its own stored schedule is one step per stage at guidance 1."""
    teacher = Tokenizer(tiny_config("model.sampling.cfg=2").model)
    teacher.save_pretrained(tmp_path / "teacher")
    d = Distiller(tiny_config("distill.cfg=2"), tmp_path / "teacher", tmp_path / "d")
    assert d.teacher.config.sampling.cfg == 2.0 and d.student.config.sampling.cfg == 1.0
    assert d.student.default_steps() == (1, 1, 1) and d.student.resolve_guidance(None) == 1.0
    assert d.student.passes_per_image(d.student.default_steps(), 1.0) == 3
