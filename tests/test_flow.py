"""Flow path, block noise, training loss and the sampler."""

import math

import pytest
import torch

from msdd.flow.path import (
    balanced_stages, block_noise, flow_loss, local_sigmoid_weight, noisy_at, renoise, sample_r, sigmoid_weight,
    stage_ends, velocity_from_end,
)  # fmt: skip
from msdd.flow.sampler import sample_multiscale
from msdd.flow.schedule import stage_windows
from msdd.tokenizer import Tokenizer

from conftest import tiny_config


def test_block_noise_covariance():
    """Within a 2x2 block: covariance (1 + gamma) I - gamma 11^T; independent across blocks."""
    g = torch.Generator().manual_seed(0)
    gamma = 0.2
    n = block_noise((4000, 1, 8, 8), gamma, g, torch.zeros(1))
    blocks = n.view(4000, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)  # (samples*blocks, 4 pixels)
    cov = torch.cov(blocks.T)
    assert torch.allclose(blocks.mean(0), torch.zeros(4), atol=0.02)
    assert torch.allclose(torch.diagonal(cov), torch.ones(4), atol=0.04)  # (1 + gamma) - gamma
    off = cov[~torch.eye(4, dtype=bool)]
    assert torch.allclose(off, torch.full_like(off, -gamma), atol=0.03)
    a, b = n[:, 0, 0, 1].flatten(), n[:, 0, 0, 2].flatten()  # neighbouring blocks
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.05


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_renoised_stage_start_has_isotropic_noise_of_std_t0(stage):
    """The previous stage's end (noise sigma, upsampled) after renoising carries iid-looking noise of
    std t0 on top of alpha (1 - sigma) x_start: the same distribution as the training pairs."""
    w = stage_windows(4, 32)
    prev, cur = w[stage - 1], w[stage]
    g = torch.Generator().manual_seed(0)
    noise_prev = torch.randn(3000, 1, prev.resolution, prev.resolution, generator=g)
    x, _ = renoise(prev.t_end * noise_prev, cur, g)  # signal 0: only the noise is left
    blocks = x.view(3000, 1, cur.resolution // 2, 2, cur.resolution // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(-1, 4)
    cov = torch.cov(blocks.T)
    assert torch.allclose(cov, torch.eye(4) * cur.t_start**2, atol=0.02)


def test_renoise_draws_block_noise_of_the_window_gamma():
    cur = stage_windows(2, 16, 0.2)[1]
    x = torch.zeros(2, 3, 8, 8)
    _, bn = renoise(x, cur, torch.Generator().manual_seed(0))
    assert torch.equal(bn, block_noise((2, 3, 16, 16), 0.2, torch.Generator().manual_seed(0), x))
    assert not torch.equal(bn, block_noise((2, 3, 16, 16), 1 / 3, torch.Generator().manual_seed(0), x))


def test_renoise_is_the_upsample_plus_block_noise():
    """The one-pass renoise (beta a n + up(alpha x + beta b)) against the formula it rearranges, and without the block
    noise it returns the same image."""
    cur = stage_windows(3, 32, 0.25)[2]
    x = torch.randn(2, 3, 16, 16)
    out, bn = renoise(x, cur, torch.Generator().manual_seed(3))
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert (out - (cur.alpha * up + cur.beta * bn)).abs().max() <= 1e-6
    alone, none = renoise(x, cur, torch.Generator().manual_seed(3), noise=False)
    assert none is None and torch.equal(alone, out)


def test_a_decode_without_the_noise_trace_gives_the_same_images():
    tok = Tokenizer(tiny_config().model).eval()
    z = torch.randn(2, *tok.config.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = sample_multiscale(tok.decoder, z, tok.windows, (1,) * len(tok.windows),
                                   generator=torch.Generator().manual_seed(1))
        plain = sample_multiscale(tok.decoder, z, tok.windows, (1,) * len(tok.windows),
                                  generator=torch.Generator().manual_seed(1), noises=False)
    assert len(traced.noises) == len(tok.windows) and plain.noises == []
    assert torch.equal(plain.image, traced.image)
    assert all(torch.equal(a, b) for a, b in zip(plain.stages, traced.stages))


def test_path_endpoints_and_velocity():
    w = stage_windows(4, 32)[2]
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    x_end, x_start = stage_ends(x, w)
    assert x_end.shape == (3, 3, 16, 16) and x_start.shape == (3, 3, 16, 16)
    assert torch.allclose(x_end[:, :, :2, :2].mean((2, 3)), x_start[:, :, 0, 0], atol=1e-6)
    noise = torch.randn_like(x_end)
    start, v = noisy_at(x_end, x_start, w, torch.ones(3), noise)
    end, _ = noisy_at(x_end, x_start, w, torch.zeros(3), noise)
    assert torch.allclose(start, (1 - w.t_start) * x_start + w.t_start * noise, atol=1e-6)
    assert torch.allclose(end, (1 - w.t_end) * x_end + w.t_end * noise, atol=1e-6)
    mid, _ = noisy_at(x_end, x_start, w, torch.full((3,), 0.3), noise)
    assert torch.allclose(mid - end, 0.3 * v, atol=1e-5)  # x_r = x_end_n + r v


def test_oracle_velocity_sampler_lands_on_the_path_end():
    """With the exact velocity, Euler steps (any count) land on the stage end; the sampler's step rule
    and the training target agree."""
    w = stage_windows(1, 16)
    x_img = torch.rand(2, 3, 16, 16) * 2 - 1
    x_end, x_start = stage_ends(x_img, w[0])
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _, v = noisy_at(x_end, x_start, w[0], torch.ones(2), noise)

    def oracle(x, tau, z):
        return v

    for steps in (1, 3, 7):
        g = torch.Generator().manual_seed(0)
        out = sample_multiscale(oracle, torch.zeros(2, 4, 4), w, [steps], generator=g).image
        assert torch.allclose(out, x_end + 0 * noise, atol=1e-5)  # e = 0 at the last stage: clean image


def test_balanced_stage_assignment():
    a = balanced_stages(10, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(a, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10
    # shuffled: a batch's order (the loader's, or an image's place in it) does not fix the stage it trains
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([balanced_stages(10, 4, g) for _ in range(200)])  # (200, 10)
    assert all(torch.equal(torch.bincount(d, minlength=4), counts) for d in draws)
    per_place = torch.stack([torch.bincount(col, minlength=4) for col in draws.T])  # (10 places, 4 stages)
    assert per_place.min() >= 25  # each place trains every stage: 50 times each expected, binomial sd 6


def test_training_times_are_logit_normal_or_uniform():
    """t_sampling: logit_normal draws r = sigmoid(n) with n ~ N(0, 1) (the paper's), uniform r ~ U(0, 1); each from
    the generator it is given."""
    like = torch.zeros(())
    r = sample_r(20000, "logit_normal", torch.Generator().manual_seed(0), like)
    logit = torch.log(r / (1 - r))
    assert abs(logit.mean().item()) < 0.03 and logit.std().item() == pytest.approx(1.0, abs=0.03)
    u = sample_r(20000, "uniform", torch.Generator().manual_seed(0), like)
    assert 0 < u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert u.std().item() == pytest.approx(math.sqrt(1 / 12), abs=0.01)
    assert torch.equal(sample_r(8, "uniform", torch.Generator().manual_seed(3), like),
                       sample_r(8, "uniform", torch.Generator().manual_seed(3), like))
    with pytest.raises(ValueError, match="unknown t_sampling 'beta'"):
        sample_r(8, "beta", None, like)


@pytest.mark.parametrize("stages", [1, 3, 4])
def test_shapes_at_every_stage(stages):
    cfg = tiny_config(stages=stages).model
    tok = Tokenizer(cfg)
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert z.shape == (2, cfg.latent_tokens, cfg.latent_dim)
    x, previews = tok.decode_stages(z, steps=1)
    assert x.shape == (2, 3, 32, 32)
    assert [p.shape[-1] for p in previews] == list(cfg.stage_resolutions)
    res = cfg.stage_resolutions
    assert res[-1] == 32 and all(b == 2 * a for a, b in zip(res, res[1:]))


def test_flow_loss_is_finite_and_per_stage():
    cfg = tiny_config("model.linear_path=false", "model.flow.prediction=v").model  # the paper's network
    tok = Tokenizer(cfg)
    # adaLN-Zero: at init the decoder ignores its inputs; give the output layer and gates weights so
    # that gradients reach the encoder
    for m in tok.decoder.modules():
        if hasattr(m, "adaln"):
            torch.nn.init.normal_(m.adaln.weight, std=0.1)
    torch.nn.init.normal_(tok.decoder.final.linear.weight, std=0.1)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    loss, per_stage = flow_loss(tok.decoder, x, tok.encoder(x), tok.windows, cfg_drop=0.1,
                                null_context=tok.decoder.null_context, generator=g, loss_weighting="sigmoid")
    assert torch.isfinite(loss) and sorted(per_stage) == [0, 1, 2]
    assert math.isclose(loss.item(), sum(v.item() for v in per_stage.values()), rel_tol=1e-5)
    loss.backward()
    assert tok.encoder.registers.grad is not None and tok.encoder.registers.grad.abs().sum() > 0


def test_x_prediction_loss_is_the_mse_to_the_stage_end():
    """prediction x (the shipped tiny-64 models): the loss is the MSE of `end_estimate` against the clean stage end
    x_end. An oracle whose latents are the images themselves returns each stage's true x_end: loss 0 in every
    stage; an estimate off by a constant c costs c^2 per stage (the sum over stages under stage_sum)."""
    windows = stage_windows(3, 32)

    class Oracle:
        offset = 0.0

        def end_estimate(self, x_r, tau, z):  # z: the full-resolution images of this stage's samples
            window = next(w for w in windows if w.resolution == x_r.shape[-1])
            return stage_ends(z, window)[0] + self.offset

    images = torch.rand(6, 3, 32, 32) * 2 - 1
    oracle = Oracle()
    loss, per_stage = flow_loss(oracle, images, images, windows, cfg_drop=0.0, prediction="x",
                                generator=torch.Generator().manual_seed(0))
    assert sorted(per_stage) == [0, 1, 2] and loss.item() < 1e-12
    oracle.offset = 0.1
    loss, per_stage = flow_loss(oracle, images, images, windows, cfg_drop=0.0, prediction="x",
                                generator=torch.Generator().manual_seed(0))
    assert all(v.item() == pytest.approx(0.01, rel=1e-4) for v in per_stage.values())
    assert loss.item() == pytest.approx(0.03, rel=1e-4)


def test_v_prediction_loss_is_the_weighted_mse_to_the_path_velocity():
    """prediction v (the paper presets): the loss is the mean squared error of the decoder's velocity against the
    stage path's, times each weighting's factor of the sample's time, plus the perceptual term on the last stage's
    one-step estimate of its end. An oracle that returns the true velocity (from the clean stage end its latents,
    the images, give) costs 0; one off by a constant c costs c^2 times the mean weight of each stage's samples."""
    windows = stage_windows(3, 32)

    class Oracle:
        offset = 0.0

        def __init__(self):
            self.seen = {}  # stage index -> the local times r of its samples

        def __call__(self, x_r, tau, z):
            w = next(w for w in windows if w.resolution == x_r.shape[-1])
            r = (tau - w.tau_end) / (w.tau_start - w.tau_end)
            self.seen[w.index] = r
            return velocity_from_end(x_r, stage_ends(z, w)[0], w, r) + self.offset

    images = torch.rand(12, 3, 32, 32) * 2 - 1

    def loss_of(offset, **kw):
        oracle = Oracle()
        oracle.offset = offset
        loss, per_stage = flow_loss(oracle, images, images, windows, prediction="v", t_sampling="uniform",
                                    generator=torch.Generator().manual_seed(0), **kw)
        assert sorted(per_stage) == [0, 1, 2] and loss.item() == pytest.approx(sum(per_stage.values()).item())
        return {i: v.item() for i, v in per_stage.items()}, oracle.seen

    assert max(loss_of(0.0)[0].values()) < 1e-7
    c = 0.1
    for weighting, weight in (("none", lambda w, r: torch.ones_like(r)),
                              ("sigmoid", lambda w, r: sigmoid_weight(w.t_at(r), 0.5)),
                              ("sigmoid_local", lambda w, r: local_sigmoid_weight(r, 0.5)),
                              ("stage", lambda w, r: torch.full_like(r, 1 / (1 - w.t_end) ** 2))):
        got, seen = loss_of(c, loss_weighting=weighting, sigmoid_bias=0.5)
        for w in windows:
            assert got[w.index] == pytest.approx(c**2 * weight(w, seen[w.index]).mean().item(), rel=1e-3), weighting

    def perceptual(x_hat, end_n):  # per-sample MSE: the oracle's one-step estimate is end_n - r c
        return (x_hat - end_n).pow(2).mean(dim=(1, 2, 3))

    got, seen = loss_of(c, perceptual=perceptual, perceptual_weight=0.5)
    last = len(windows) - 1
    assert got[last] == pytest.approx(c**2 + 0.5 * c**2 * seen[last].pow(2).mean().item(), rel=1e-3)
    assert got[0] == pytest.approx(c**2, rel=1e-3) and got[1] == pytest.approx(c**2, rel=1e-3)


def test_the_loss_weights_by_hand():
    """sigmoid(b - logSNR(t)) with logSNR = 2 log((1 - t) / t), and the reference's local form
    e^b sigmoid(logSNR(r) - b) / (r (1 - r)): at t = r = 1/5, logSNR = 2 log 4 and e^(logSNR) = 16."""
    fifth, half = torch.tensor([0.2]), torch.tensor([0.5])
    assert sigmoid_weight(half, 0.0).item() == pytest.approx(0.5)
    assert sigmoid_weight(fifth, 0.0).item() == pytest.approx(1 / 17)
    assert sigmoid_weight(fifth, 1.0).item() == pytest.approx(1 / (1 + 16 / math.e))
    assert local_sigmoid_weight(half, 0.0).item() == pytest.approx(2.0)
    assert local_sigmoid_weight(fifth, 0.0).item() == pytest.approx(100 / 17)
    assert local_sigmoid_weight(fifth, 1.0).item() == pytest.approx(math.e / (1 + math.e / 16) / 0.16)


def test_sampler_determinism_and_seeds():
    tok = Tokenizer(tiny_config().model)
    torch.nn.init.normal_(tok.decoder.final.linear.weight, std=0.1)  # non-zero output so noise matters
    z = torch.randn(2, 8, 4)
    a = tok.decode(z, generator=torch.Generator().manual_seed(1))
    b = tok.decode(z, generator=torch.Generator().manual_seed(1))
    c = tok.decode(z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_cfg_one_equals_conditional_pass_and_cfg_mixes():
    tok = Tokenizer(tiny_config().model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random: at init the zero gates leave the velocity blind to the latent
        for p in tok.decoder.parameters():
            p.normal_(std=0.1, generator=g)
    z = torch.randn(2, 8, 4)
    x = torch.randn(2, 3, 8, 8)
    from msdd.flow.sampler import guided_velocity

    with torch.no_grad():
        cond = tok.decoder(x, torch.full((2,), 0.9), z)
        null = tok.decoder(x, torch.full((2,), 0.9), tok.decoder.null_like(z))
        assert (cond - null).abs().mean() > 0.05 * cond.abs().mean()  # the checks below tell the two passes apart
        # the null pass sees the learned null context, the one training's context drop puts in (`drop_context`)
        assert torch.equal(tok.decoder.null_like(z), tok.decoder.null_context.expand(2, -1, -1))
        assert torch.allclose(guided_velocity(tok.decoder, x, 0.9, z, 1.0), cond, atol=1e-6)
        assert torch.allclose(guided_velocity(tok.decoder, x, 0.9, z, 0.0), null, atol=1e-6)
        assert torch.allclose(guided_velocity(tok.decoder, x, 0.9, z, 2.5), null + 2.5 * (cond - null), atol=1e-5)


def test_sampler_rejects_wrong_step_lists():
    tok = Tokenizer(tiny_config().model)
    with pytest.raises(ValueError, match="one entry per stage"):
        sample_multiscale(tok.decoder, torch.zeros(1, 8, 4), tok.windows, [1, 1], generator=None)
    with pytest.raises(ValueError, match=r"every stage needs >= 1 step, got \[1, 0, 1\]"):  # would skip a stage
        sample_multiscale(tok.decoder, torch.zeros(1, 8, 4), tok.windows, [1, 0, 1], generator=None)
    with pytest.raises(ValueError, match="steps must be"):
        tok.decode(torch.zeros(1, 8, 4), steps=[0, 1, 1])


def test_noise_trace_of_a_chain():
    """With the exact velocity of an all-zero image (the state is pure scaled noise), every stage ends at
    e_s N_s with the traced unit noise N_s, which has unit variance."""
    windows = stage_windows(4, 32)

    def exact_for_zero_content(x, tau, z):
        w = next(w for w in windows if w.resolution == x.shape[-1])
        r = w.r_of_tau(float(tau[0]))
        t = w.t_at(r)
        return (w.t_start - w.t_end) / t * x  # x_r = t N and v = (t0 - e) N

    z = torch.zeros(64, 4, 4)
    g = torch.Generator().manual_seed(0)
    x, outs, noises = sample_multiscale(exact_for_zero_content, z, windows, [3, 1, 2, 1], generator=g)
    for w, o, n in zip(windows, outs, noises):
        assert torch.allclose(o, w.t_end * n, atol=1e-4)
        assert n.var().item() == pytest.approx(1.0, abs=0.06)
    assert x.abs().max() < 1e-4


class RecordingDecoder(torch.nn.Module):
    """Wraps a decoder; records, at every call, the input x, its tau and the generator's state then."""

    def __init__(self, decoder, generator):
        super().__init__()
        self.decoder, self.generator, self.calls = decoder, generator, []

    def forward(self, x, tau, z):
        self.calls.append((x.clone(), float(tau[0]), self.generator.get_state()))
        return self.decoder(x, tau, z)

    def null_like(self, z):
        return self.decoder.null_like(z)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sample_from_start_equals_continuing_the_full_chain(guidance):
    """`start=(stage, r, x, noise)` continues a chain: restarting from the output of stage k (r = 0), or from
    the state part-way through a stage (r = 1/2 of a 2-step stage, whose remaining step is then 1), with
    the generator in the state the full chain had there, gives the full chain's final image, later stage
    outputs and traced noises. All randomness is drawn from the generator between stages (renoising), so
    its state at any decoder call of stage k is the state after stage k's renoise."""
    tok = Tokenizer(tiny_config(stages=4).model).eval()  # 32 px, 4 stages: 4, 8, 16, 32
    torch.nn.init.normal_(tok.decoder.final.linear.weight, std=0.1)  # non-zero output so every step matters
    windows, steps = tok.windows, [2, 2, 2, 2]
    z = torch.randn(2, 8, 4)
    g = torch.Generator().manual_seed(3)
    rec = RecordingDecoder(tok.decoder, g)
    with torch.no_grad():
        x, stages, noises = sample_multiscale(rec, z, windows, steps, guidance=guidance, generator=g)
        # the stage of each call, from its input resolution
        stage_of = [next(w.index for w in windows if w.resolution == c[0].shape[-1]) for c in rec.calls]
        assert stage_of == [0, 0, 1, 1, 2, 2, 3, 3]
        for k in (0, 1, 2):
            # (a) from the end of stage k (r = 0): the generator as the chain had it during stage k
            g2 = torch.Generator().manual_seed(999)
            g2.set_state(rec.calls[stage_of.index(k)][2])
            x2, stages2, noises2 = sample_multiscale(tok.decoder, z, windows, steps, guidance=guidance, generator=g2,
                                                     start=(k, 0.0, stages[k], noises[k]))
            torch.testing.assert_close(x2, x, rtol=0, atol=1e-6)
            assert len(stages2) == len(windows) - k
            for a, b in zip(stages2[1:] + noises2[1:], stages[k + 1:] + noises[k + 1:]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            # (b) part-way: the state at the second call of stage k, local time 1/2, one step left
            x_mid, tau_mid, state = rec.calls[stage_of.index(k) + 1]
            x_mid = x_mid[: len(z)]  # a guided pass sees the doubled batch [x, x]
            assert tau_mid == pytest.approx(windows[k].tau_at(0.5))
            g3 = torch.Generator().manual_seed(999)
            g3.set_state(state)
            rest = [1 if i == k else n for i, n in enumerate(steps)]
            x3 = sample_multiscale(tok.decoder, z, windows, rest, guidance=guidance, generator=g3,
                                   start=(k, 0.5, x_mid, noises[k])).image
            torch.testing.assert_close(x3, x, rtol=0, atol=1e-6)
        # the generator state matters: restarting with a fresh one gives another image
        other = sample_multiscale(tok.decoder, z, windows, steps, guidance=guidance,
                                  generator=torch.Generator().manual_seed(3),
                                  start=(1, 0.0, stages[1], noises[1])).image
        assert (other - x).abs().max() > 1e-3
