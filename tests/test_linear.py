"""PCA (the linear baseline and the start of the linear path), x-prediction, the student's pixel loss."""

import pytest
import torch

from msdd.flow.path import noisy_at, stage_ends, velocity_from_end
from msdd.flow.schedule import stage_windows
from msdd.models.linear import fit_pca, pca_reconstruct
from msdd.tokenizer import Tokenizer

from conftest import tiny_config


def test_pca_hand_computed_case():
    """Points on a line through m along u: one component is u (up to sign), its variance the sample
    variance of the coefficients, and a vector in the span reconstructs exactly; the orthogonal part of
    one outside it is removed."""
    m, u = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 4.0]) / 5
    coeff = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    x = m + coeff[:, None] * u
    pca = fit_pca(x, 1)
    assert torch.allclose(pca.mean, m, atol=1e-6)
    assert torch.allclose(pca.components[0].abs(), u.abs(), atol=1e-6)
    assert pca.variance[0].item() == pytest.approx(coeff.var().item(), rel=1e-5)  # 2.5
    inside = (m + 0.7 * u)[None]
    assert torch.allclose(pca_reconstruct(pca, inside), inside, atol=1e-6)
    w = torch.tensor([4.0, 0.0, -3.0]) / 5  # orthogonal to u
    assert torch.allclose(pca_reconstruct(pca, inside + 0.5 * w), inside, atol=1e-6)


def test_pca_randomised_path_matches_exact():
    """With more than 4096 samples of more than 4096 values (min(n, d) > 4096) the fit is randomised; on data of low
    rank it recovers the same span, orthonormal components by decreasing variance, and draws from its own seed."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(4100, 6, generator=g))[0].T  # (6, 4100) orthonormal
    x = (torch.randn(4200, 6, generator=g) * torch.tensor([9.0, 7, 5, 3, 2, 1])) @ basis
    pca = fit_pca(x, 6)
    assert pca.components.shape == (6, 4100) and (pca.variance.diff() < 0).all()
    assert torch.allclose(pca_reconstruct(pca, x), x, atol=1e-3)
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(6), atol=1e-5)
    torch.randn(10)  # the global random state moved on: the fit draws from its own seed
    assert torch.equal(fit_pca(x, 6).components, pca.components)


def test_pca_takes_at_most_as_many_components_as_the_smaller_side():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert fit_pca(x, 3).components.shape == (3, 3)
    with pytest.raises(ValueError, match="PCA with 4 components needs at least 4 samples of at least 4 values"):
        fit_pca(x, 4)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_velocity_from_true_end_is_the_path_velocity(stage):
    """Given the true clean end, x-prediction's velocity equals the flow target of the same path point."""
    w = stage_windows(3, 32)[stage]
    g = torch.Generator().manual_seed(stage)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    x_end, x_start = stage_ends(images, w)
    r = torch.tensor([0.9, 0.5, 0.2, 0.05])
    x_r, target = noisy_at(x_end, x_start, w, r, torch.randn(x_end.shape, generator=g))
    assert torch.allclose(velocity_from_end(x_r, x_end, w, r), target, atol=1e-4)


def fresh_linear_tokenizer(*overrides: str):
    """An untrained tiny tokenizer whose linear path is set from a PCA of 300 random 32 px images; returns
    (tokenizer, the PCA, three images to decode)."""
    cfg = tiny_config(*overrides).model
    tok = Tokenizer(cfg)
    data = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pca = fit_pca(data, cfg.latent_tokens * cfg.latent_dim)
    tok.init_linear_path(pca)
    return tok, pca, data[:3] * 0.5


def test_fresh_linear_path_tokenizer_is_the_pca_code():
    """With the linear path set from a PCA and nothing trained yet, encode + decode (any steps, x-prediction)
    reproduces the PCA reconstruction."""
    tok, pca, x = fresh_linear_tokenizer("model.linear_path=true", "model.flow.prediction=x")
    want = pca_reconstruct(pca, x).clamp(-1, 1)
    for steps in ([1, 1, 1], [3, 2, 2]):
        assert torch.allclose(tok.decode(tok.encode(x), steps=steps), want, atol=1e-4)


def test_linear_path_training_starts_from_pca_and_learns(tmp_path):
    """A stage-1 run with the linear path fits the PCA on its training crops before step 0 and trains
    the linear maps at lr * train.linear_lr_scale (0 keeps them fixed)."""
    from msdd.train.stage1 import Stage1Trainer

    cfg = tiny_config("model.linear_path=true", "model.flow.prediction=x", "train.pca_crops=300",
                      "train.linear_lr_scale=0", "train.max_steps=3", "model.flow.cfg_drop=0")
    tr = Stage1Trainer(cfg, tmp_path / "run")
    start = tr.tok.decoder.from_linear.weight.detach().clone()
    assert start.abs().sum() > 0  # set from the fit
    transformer = tr.tok.decoder.final.linear.weight.detach().clone()
    tr.fit(progress=False)
    assert torch.equal(tr.tok.decoder.from_linear.weight, start)  # frozen at scale 0
    assert not torch.equal(tr.tok.decoder.final.linear.weight, transformer)  # the rest trains


def test_the_linear_paths_pca_needs_as_many_crops_as_components(tmp_path):
    """tiny-test's linear path is a PCA with 8 x 4 = 32 components: 32 training crops fit it, 31 are an error that
    names the count, the source and the settings that fix it."""
    from msdd.train.stage1 import Stage1Trainer

    base = ("model.linear_path=true", "model.flow.prediction=x")
    Stage1Trainer(tiny_config(*base, "train.pca_crops=32"), tmp_path / "enough")
    with pytest.raises(ValueError, match=r"model.linear_path starts from a PCA with 32 components, but data.source="
                                         r"embedded gave only 31 training crops; add images, raise train.pca_crops"):
        Stage1Trainer(tiny_config(*base, "train.pca_crops=31"), tmp_path / "few")


def test_student_pixel_loss_changes_gradients_only_when_weighted(tmp_path):
    """distill.lambda_pix adds lambda_rec * lambda_pix * grad MSE(student, real): zero at weight 0, and
    linear in the weight (the gradient change at 1 is twice that at 0.5)."""
    from msdd.train.distill import Distiller

    teacher = Tokenizer(tiny_config().model)
    teacher.save_pretrained(tmp_path / "teacher")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grads = {}
    for lam in (0.0, 0.5, 1.0):
        cfg = tiny_config("distill.discriminator=patch", "distill.perceptual=none", "distill.batch_size=4",
                          "distill.lambda_adv=0", f"distill.lambda_pix={lam}")
        d = Distiller(cfg, tmp_path / "teacher", tmp_path / f"run{lam}")
        loss, out = d.micro_step(images, torch.Generator().manual_seed(0))
        assert ("l_pix" in out) == (lam > 0)
        loss.backward()
        grads[lam] = torch.cat([p.grad.flatten() for p in d.student.decoder.parameters() if p.grad is not None])
    change = grads[0.5] - grads[0.0]
    assert change.abs().max() > 1e-6
    torch.testing.assert_close(grads[1.0] - grads[0.0], 2 * change, atol=1e-6, rtol=1e-3)


def test_fresh_ssdd_with_linear_path_and_x_prediction_is_the_pca_code():
    """The SSDD family with the token latent takes the same recipe: a fresh model decodes as the PCA code
    at any step count, its x-prediction loss is MSE on the image estimate, and a spatial latent has no
    linear path."""
    from msdd.flow.ssdd import ssdd_loss

    ssdd = ["model.family=ssdd", "model.ssdd.base_channels=8", "model.ssdd.channel_mults=[1,2]",
            "model.ssdd.mid_depth=1", "model.ssdd.mid_heads=2", "model.ssdd.mid_mlp_hidden=32",
            "model.ssdd.encoder_channels=[8,8,16,16]", "train.bf16=false", "model.linear_path=true"]
    tok, pca, x = fresh_linear_tokenizer(*ssdd, "model.ssdd.prediction=x")
    want = pca_reconstruct(pca, x).clamp(-1, 1)
    for steps in (1, 4):
        assert torch.allclose(tok.decode(tok.encode(x), steps=steps), want, atol=1e-4)
    loss, terms = ssdd_loss(tok.decoder, x, tok.encode(x), generator=torch.Generator().manual_seed(1))
    assert set(terms) == {"loss_x"}
    assert loss.item() == pytest.approx((pca_reconstruct(pca, x) - x).pow(2).mean().item(), rel=1e-4)
    torch.nn.init.normal_(tok.decoder.out_conv.weight, std=0.05)  # now the network adds to x_lin
    assert not torch.allclose(tok.decode(tok.encode(x), steps=1), want, atol=1e-3)
    spatial = Tokenizer(tiny_config(*ssdd, "model.ssdd.latent_kind=spatial").model)
    assert spatial.decoder.from_linear is None and not spatial.config.uses_linear_path


def test_refiner_starts_as_the_identity_trains_and_fine_tunes_a_model_without_one(tmp_path):
    """model.refiner_width: a fresh tokenizer with a refiner still decodes as the PCA code; a stage-1 run
    trains the refiner (the linear maps stay frozen); a model trained without one fine-tunes into one
    (train.init_from) with the refiner starting as the identity; the refiner needs the linear path."""
    from msdd.train.stage1 import Stage1Trainer

    base = ("model.linear_path=true", "model.flow.prediction=x", "train.pca_crops=300", "train.linear_lr_scale=0",
            "model.flow.cfg_drop=0", "train.max_steps=3")
    cfg = tiny_config(*base, "model.refiner_width=8", "model.refiner_blocks=1")
    tok, pca, x = fresh_linear_tokenizer(*base, "model.refiner_width=8", "model.refiner_blocks=1")
    assert torch.allclose(tok.decode(tok.encode(x), steps=[1, 1, 1]), pca_reconstruct(pca, x).clamp(-1, 1), atol=1e-4)

    plain = Stage1Trainer(tiny_config(*base), tmp_path / "plain")
    plain.fit(progress=False)
    tr = Stage1Trainer(replace_cfg(cfg, init_from=str(tmp_path / "plain" / "model")), tmp_path / "ft")
    assert torch.equal(tr.tok.decoder.from_linear.weight, plain.ema.module.decoder.from_linear.weight)
    assert tr.tok.decoder.refiner.out.weight.abs().sum() == 0  # the identity
    tr.fit(progress=False)
    assert tr.tok.decoder.refiner.out.weight.abs().sum() > 0  # trained
    assert torch.equal(tr.tok.decoder.from_linear.weight, plain.ema.module.decoder.from_linear.weight)  # frozen
    with pytest.raises(ValueError, match="refiner_width"):
        tiny_config("model.linear_path=false", "model.refiner_width=8")


def replace_cfg(cfg, **train):
    from dataclasses import replace

    return replace(cfg, train=replace(cfg.train, **train))
