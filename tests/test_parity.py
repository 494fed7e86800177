"""The paper's reference recipe as config options (issue 15): the stage-1 loss weighting on local time
(D1) and the loss scale (D14)."""

import dataclasses

import pytest
import torch

from conftest import tiny_config
from msdd.config import load_config
from msdd.flow.path import local_sigmoid_weight, sigmoid_weight
from msdd.flow.schedule import stage_windows
from msdd.tokenizer import Tokenizer


def test_local_sigmoid_weight_by_hand_and_equal_across_stages():
    # -1/2 dlogSNR/dr exp(-3) sigmoid(logSNR(r) + 3), logSNR(r) = 2 log((1 - r) / r), by hand:
    # r = 0.5: logSNR 0, 4 * e^-3 * sigmoid(3) = 4 * 0.0497871 * 0.9525741 = 0.1897035
    # r = 0.1: logSNR 2 ln 9 = 4.394449, e^-3 * sigmoid(7.394449) / 0.09 = 0.5528498
    # r = 0.9: logSNR -4.394449, e^-3 * sigmoid(-1.394449) / 0.09 = 0.1099179
    got = local_sigmoid_weight(torch.tensor([0.5, 0.1, 0.9]), -3.0)
    assert got.tolist() == pytest.approx([0.1897035, 0.5528498, 0.1099179], rel=1e-5)
    g = torch.Generator().manual_seed(0)
    r = torch.sigmoid(torch.randn(400_000, generator=g))  # logit-normal local times, as paper-256 samples
    windows = stage_windows(4, 256)
    local = [local_sigmoid_weight(r, -3.0).mean().item() for _ in windows]  # a function of r alone
    assert all(m == pytest.approx(0.22, abs=0.01) for m in local)
    # the global-time weighting (msdd's earlier paper-256 default) on the same r: each stage its own mean
    glob = [sigmoid_weight(w.t_end + r * (w.t_start - w.t_end), 0.0).mean().item() for w in windows]
    assert glob[0] > 10 * glob[-1] and glob == sorted(glob, reverse=True)


@pytest.mark.parametrize("batch", [8, 6])
def test_loss_scale_sample_mean_against_stage_sum(batch):
    cfg = tiny_config("model.flow.prediction=v", "model.flow.cfg_drop=0.0")
    images = torch.rand(batch, 3, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    losses = {}
    for reduction in ("stage_sum", "sample_mean"):
        model = dataclasses.replace(cfg.model, flow=dataclasses.replace(cfg.model.flow, loss_reduction=reduction))
        torch.manual_seed(0)
        tok = Tokenizer(model)
        losses[reduction] = tok.training_loss(images, torch.Generator().manual_seed(1))
    (sum_loss, terms), (mean_loss, mean_terms) = losses["stage_sum"], losses["sample_mean"]
    stages = [terms[f"loss_stage{s}"] for s in range(cfg.model.flow.num_stages)]
    assert terms == mean_terms  # the same draws, the same per-stage means
    counts = torch.bincount(torch.arange(batch) % len(stages), minlength=len(stages))  # balanced assignment
    assert sum_loss.item() == pytest.approx(sum(stages).item(), rel=1e-6)
    assert mean_loss.item() == pytest.approx(sum(n * s for n, s in zip(counts, stages)).item() / batch, rel=1e-6)
    if batch % len(stages) == 0:
        assert sum_loss.item() == pytest.approx(len(stages) * mean_loss.item(), rel=1e-6)


def test_paper_presets_take_the_reference_loss():
    for preset in ("paper-256", "paper-512", "paper-256-s3"):
        f = load_config(preset).model.flow
        assert (f.loss_weighting, f.sigmoid_bias, f.loss_reduction) == ("sigmoid_local", -3.0, "sample_mean"), preset
    # the paper's Table 3: lambda_perc 0.5 for four stages, 1.0 for the three-stage student (rFID 2.04)
    assert [load_config(p).distill.lambda_perc for p in ("paper-256", "paper-256-s3")] == [0.5, 1.0]
    f = load_config("tiny-64").model.flow  # the small-scale recipe keeps what issue 12 measured
    assert (f.loss_weighting, f.loss_reduction) == ("none", "stage_sum")


def test_info_prints_the_effective_recipe(capsys):
    import json

    from msdd.cli import main

    assert main(["info", "--preset", "paper-256"]) == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert recipe["stage1"]["loss_weighting"] == "sigmoid_local" and recipe["stage1"]["loss_reduction"] == "sample_mean"
    assert recipe["stage1"]["ema_decay"] == 0.9999 and recipe["stage2"]["discriminator"] == "dino"
    assert recipe["stage2"]["ema_decay"] == 0.9999 and recipe["stage2"]["ema_warmup"] is False  # D12
    assert recipe["stage2"]["lr"] == pytest.approx(1e-4 * 128 / 256) and recipe["stage2"]["disc_heads"] == "reference"
    assert recipe["networks"] == {"init": ["reference", "reference"], "context_pos": ["cross_both", "cross_both"],
                                  "time_scale": 1.0}


def test_info_recipe_shows_each_setting_it_names(capsys):
    """Every entry of the recipe `msdd info` prints is its own setting: each set here to a value no other entry
    has, so that an entry showing another setting (stage 1's where stage 2's belongs, say) or a default is seen;
    stage 2's learning rates scaled by batch_size / lr_reference_batch."""
    import json

    from msdd.cli import main

    stage1 = {"model.flow.loss_weighting": "sigmoid", "model.flow.sigmoid_bias": 0.37,
              "model.flow.loss_reduction": "sample_mean", "model.flow.t_sampling": "uniform",
              "model.flow.prediction": "x", "model.flow.lpips_weight": 0.41, "model.flow.cfg_drop": 0.13,
              "train.batch_size": 7, "train.lr": 0.00123, "train.warmup_steps": 17, "train.max_steps": 1234,
              "train.min_lr_ratio": 0.23, "train.ema_decay": 0.987, "train.ema_warmup": False,
              "train.grad_clip": 2.7, "train.bf16": True}
    stage2 = {"distill.batch_size": 6, "distill.lr_reference_batch": 24, "distill.disc_grad_clip": 3.1,
              "distill.max_steps": 321, "distill.ema_decay": 0.995, "distill.ema_warmup": True,
              "distill.discriminator": "patch", "distill.disc_heads": "reference", "distill.student_cfg_drop": 0.07,
              "distill.perceptual": "none", "distill.lambda_rec": 2.2, "distill.lambda_perc": 0.55,
              "distill.lambda_adv": 0.33, "distill.lambda_pix": 0.44, "distill.adaptive_adv": False,
              "distill.adaptive_of": "reference", "distill.cfg": 1.7}
    networks = {"model.encoder.init": "reference", "model.decoder.init": "zero", "model.encoder.context_pos": "1d",
                "model.decoder.context_pos": "cross_both", "model.decoder.time_scale": 12.5}
    settings = {**stage1, **stage2, **networks, "distill.lr": 0.0004, "distill.disc_lr": 0.0008}
    overrides = [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["info", "--preset", "tiny-64", *overrides]) == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert recipe["stage1"] == {k.rsplit(".", 1)[1]: v for k, v in stage1.items()}
    expected = {k.split(".", 1)[1]: v for k, v in stage2.items()}
    expected["teacher_cfg"] = expected.pop("cfg")
    assert recipe["stage2"] == {**expected, "lr": pytest.approx(0.0004 * 6 / 24), "disc_lr": pytest.approx(0.0008 / 4)}
    assert recipe["networks"] == {"init": ["reference", "zero"], "context_pos": ["1d", "cross_both"],
                                  "time_scale": 12.5}


def test_time_embedding_scale():
    """D8: the decoder's sinusoidal time embedding sees time_scale * tau (the reference: tau itself)."""
    import math

    from msdd.models.timestep import TimestepEmbedder

    tau = torch.tensor([0.5])
    for scale in (1.0, 1000.0):
        emb = TimestepEmbedder(8, freq_dim=4, time_scale=scale)
        args = [0.5 * scale * 1.0, 0.5 * scale * 0.01]  # frequencies exp(-ln(10^4) * [0, 1] / 2) = 1, 0.01
        by_hand = torch.tensor([[math.cos(args[0]), math.cos(args[1]), math.sin(args[0]), math.sin(args[1])]])
        assert torch.allclose(emb(tau), emb.mlp(by_hand), atol=1e-6), scale
    assert load_config("paper-256").model.decoder.time_scale == 1.0
    assert load_config("paper-512").model.decoder.time_scale == 1.0
    assert load_config("tiny-64").model.decoder.time_scale == 1000.0  # the shipped models' setting


def test_cross_rope_base_on_both_axes():
    """D9: context token i sits at (row = grid, column = i); "cross" scales the base by L / grid on the
    column axis only, "cross_both" on both (the reference)."""
    import math

    from msdd.models.rope import rope_angles

    grid, full, L, head_dim = 4, 8, 16, 16  # 4 pairs per axis; base' = 10^4 * 16 / 4 = 4 * 10^4
    quarter = head_dim // 4
    cross = rope_angles(grid, full, L, head_dim, "cross")[grid * grid:]
    both = rope_angles(grid, full, L, head_dim, "cross_both")[grid * grid:]
    i, j = 5, 1  # context token 5, second frequency of each axis
    assert cross[i, j].item() == pytest.approx(grid * 10000.0 ** (-j / quarter))
    assert both[i, j].item() == pytest.approx(grid * 40000.0 ** (-j / quarter))
    assert cross[i, quarter + j].item() == both[i, quarter + j].item() == pytest.approx(i * 40000.0 ** (-j / quarter))
    assert torch.equal(rope_angles(grid, full, L, head_dim, "cross")[:grid * grid],
                       rope_angles(grid, full, L, head_dim, "cross_both")[:grid * grid])  # image tokens unchanged
    assert math.isclose(both[i, 0].item(), cross[i, 0].item())  # frequency 0 has no base
    assert load_config("paper-256").model.decoder.context_pos == "cross_both"
    assert load_config("tiny-64").model.decoder.context_pos == "cross"
    # the other two layouts: "1d" rotates every pair by the token index i (base 10^4 over all pairs), "none" none
    one_d = rope_angles(grid, full, L, head_dim, "1d")[grid * grid:]
    half = head_dim // 2
    assert one_d[i, 3].item() == pytest.approx(i * 10000.0 ** (-3 / half)) and one_d[0].abs().max() == 0
    assert rope_angles(grid, full, L, head_dim, "none")[grid * grid:].abs().max() == 0


def test_image_rope_is_2d_over_the_centred_crop():
    """Image token t = r * grid + c (row-major) of a stage's grid x grid tokens sits at (r + o, c + o), o = (full -
    grid) / 2 its offset in the final-stage grid: the first half of the rotated pairs turns by the row, the second by
    the column, base 10000. A stage's tokens must sit where their region sits in the final image (rows and columns
    told apart, a coarse stage centred), or the one set of weights cannot serve every stage."""
    from msdd.models.rope import rope_angles

    grid, full, L, head_dim = 4, 8, 3, 16
    quarter = head_dim // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    for g, offset in ((grid, (full - grid) / 2), (full, 0.0)):  # a coarse stage, the final one
        ang = rope_angles(g, full, L, head_dim, "none")
        assert ang.shape == (g * g + L, head_dim // 2)
        for r, c in ((0, 0), (1, 3), (3, 2)):
            t = r * g + c
            torch.testing.assert_close(ang[t, :quarter], (r + offset) * freqs, rtol=0, atol=1e-12)
            torch.testing.assert_close(ang[t, quarter:], (c + offset) * freqs, rtol=0, atol=1e-12)
        assert (ang[g * g:] == 0).all()  # "none": the context tokens are not rotated


def test_the_encoder_lays_out_its_image_tokens_row_major():
    """The image tokens enter the blocks row-major (token r * grid + c is the patch at row r, column c), the order
    in which `rope_angles` gives token t its row and column: an image that is zero but for one patch off the diagonal
    gives exactly one nonzero token, at that index (column-major tokens would turn rows by columns' angles)."""
    tok = Tokenizer(tiny_config().model).eval()
    enc = tok.encoder
    p, grid = enc.cfg.patch_size, enc.grid
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.zeros(1, 3, grid * p, grid * p)
    r, c = 0, grid - 1
    images[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = 1.0
    with torch.no_grad():
        enc.patch_embed.bias.zero_()
        enc(images)
    nonzero = seen[0][0].abs().amax(-1).nonzero().flatten().tolist()
    assert nonzero == [r * grid + c]


@pytest.mark.parametrize("context_pos, equivariant", [("none", True), ("cross", False)])
def test_the_encoder_tells_its_registers_apart_by_the_configured_rope(context_pos, equivariant):
    """model.encoder.context_pos places the register tokens for RoPE as it does the decoder's context tokens: with
    "none" the registers have no position, so permuting them permutes the latent tokens (the encoder is
    permutation-equivariant in its registers); with "cross" (the default) each has its own position and the latent
    is not a permutation of the other. Every weight random (the linear path's to_latent starts at zero)."""
    cfg = tiny_config(f"model.encoder.context_pos={context_pos}").model
    tok = Tokenizer(cfg).eval()
    enc = tok.encoder
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0, 0.05)
        for block in enc.blocks:  # sharp attention: positions matter (near-uniform attention hides them)
            for norm in (block.img.q_norm, block.img.k_norm, block.ctx.q_norm, block.ctx.k_norm):
                norm.weight.fill_(3.0)
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    perm = torch.randperm(cfg.latent_tokens, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        linear = enc.to_linear(images.flatten(1)).view(2, *cfg.latent_shape)  # the linear path's part: not permuted
        z = enc(images) - linear
        enc.registers.copy_(enc.registers[:, perm])
        z_perm = enc(images) - linear
    assert (z_perm - z).abs().max() > 1e-3
    err = (z_perm - z[:, perm]).abs().max().item()
    assert err <= 1e-5 if equivariant else err > 1e-3


def test_context_drop_rate():
    """D11 (and stage 1's cfg_drop): each latent is replaced by the null context with probability `rate`,
    measured over many samples (3 sigma of a binomial; a wrong rate or a per-batch drop fails)."""
    from msdd.flow.path import drop_context

    n, rate = 20_000, 0.1
    z, null = torch.ones(n, 2, 3), torch.zeros(1, 2, 3)
    out = drop_context(z, null, rate, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=(1, 2))
    assert ((out == 0) | (out == 1)).all() and (dropped | (out == 1).all(dim=(1, 2))).all()  # whole latents
    sigma = (n * rate * (1 - rate)) ** 0.5
    assert abs(dropped.sum().item() - n * rate) < 3 * sigma
    assert load_config("paper-256").distill.student_cfg_drop == 0.1
    assert load_config("tiny-64").distill.student_cfg_drop == 0


def test_reference_initialisation():
    """D10: init=reference gives PyTorch's default init to the adaLN and final layers (adaLN-zero
    otherwise) and encoder registers of std 1 (0.02 otherwise)."""
    for init, zero, reg_std in (("zero", True, 0.02), ("reference", False, 1.0)):
        cfg = load_config("tiny-64", ["model.linear_path=false", "model.flow.prediction=v",
                                      f"model.encoder.init={init}", f"model.decoder.init={init}"]).model
        torch.manual_seed(0)
        tok = Tokenizer(cfg)
        adaln = [m.weight for n, m in tok.decoder.named_modules() if n.endswith("adaln")]
        assert len(adaln) == cfg.decoder.depth * 2 + 1  # two streams per block + the final layer
        assert all(bool((w == 0).all()) == zero for w in adaln + [tok.decoder.final.linear.weight]), init
        assert tok.encoder.registers.std().item() == pytest.approx(reg_std, rel=0.1), init
    assert load_config("paper-256").model.decoder.init == "reference" == load_config("paper-256").model.encoder.init
