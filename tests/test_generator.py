"""The latent generator (`msdd.generator`): both latent shapes, FLOP counts, deterministic sampling with
guidance, training on real latents of the shipped tokenizer, and `msdd gen-train` / `msdd generate`."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from msdd.cli import main
from msdd.config import load_config
from msdd.eval.flops import count_flops
from msdd.generator import (
    GeneratorConfig, build_generator, generate, generate_images, generator_flops, load_gen_config, load_generator,
    sample_latents, sampling_flops,
)  # fmt: skip
from msdd.data.images import to_uint8
from msdd.generator.config import GenDataConfig
from msdd.generator.data import encode_latents, image_records
from msdd.generator.files import sample_grid, save_generator
from msdd.generator.flow import flow_matching_loss
from msdd.generator.train import GeneratorTrainer
from msdd.seeding import image_generators
from msdd.tokenizer import Tokenizer

from conftest import assert_same_runs, straight_and_resumed

TINY_GEN = GeneratorConfig(width=32, depth=2, heads=2, mlp_hidden=64, patch_size=2)
# gen-tiny shrunk for the tests: `--set` arguments of `msdd gen-train`
TINY_SET = ["generator.width=32", "generator.depth=2", "generator.heads=2", "generator.mlp_hidden=64",
            "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1", "train.ckpt_every=2",
            "data.images=8"]
# a 32 px SSDD tokenizer with the f8c4 grid latent (4, 4, 4) (random weights, as tests/test_ssdd.py's)
SSDD_SPATIAL = ["model.ssdd.latent_kind=spatial", "model.ssdd.base_channels=8", "model.ssdd.channel_mults=[1,2]",
                "model.ssdd.mid_depth=1", "model.ssdd.mid_heads=2", "model.ssdd.mid_mlp_hidden=32",
                "model.ssdd.steps=2", "model.ssdd.encoder_channels=[8,8,16,16]", "model.linear_path=false"]


def gen_args(*extra: str) -> list[str]:
    return [a for o in (*TINY_SET, *extra) for a in ("--set", o)]


def resaved(model, meta: dict, directory, drop=()):
    """`model` saved to `directory` with the record of the saved generator `meta` is the metadata of (less `drop`)."""
    return save_generator(model, directory, **{k: v for k, v in meta.items()
                                               if k not in ("generator", "latent_shape", *drop)})


def sample_pixels(folder) -> list[np.ndarray]:
    """The (R, R, 3) pixels of folder/images/*.png, in order."""
    return [np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


def as_pixels(images: torch.Tensor) -> list[np.ndarray]:
    """Images (N, 3, R, R) in [-1, 1] as the (R, R, 3) pixels a PNG of each holds."""
    return [x.permute(1, 2, 0).numpy() for x in to_uint8(images)]


def randomised(model):
    """Generators start with a zero output layer (v = 0); give it weights so that samples depend on it."""
    torch.nn.init.normal_(model.final.linear.weight, std=0.2)
    torch.nn.init.normal_(model.final.adaln.weight, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def shipped():
    return Tokenizer.from_pretrained()  # the bundled tiny-64 student: latents (32, 8)


@pytest.fixture
def spatial_tok(tmp_path):
    tok = Tokenizer(load_config("ssdd-tiny-test", SSDD_SPATIAL).model).eval()
    tok.latent_mean.copy_(torch.tensor([0.5, -0.3, 1.0, 0.2]))
    tok.latent_std.copy_(torch.tensor([2.0, 0.5, 1.5, 0.8]))
    tok.save_pretrained(tmp_path / "ssdd")
    return tok


# ---------------------------------------------------------------------------------------------
# network, FLOPs, sampling


def test_normalised_latents_round_trip(shipped, spatial_tok):
    for tok in (shipped, spatial_tok):
        z = torch.randn(3, *tok.config.latent_shape) * 3 + 1
        zn = tok.normalize_latents(z)
        assert not torch.allclose(zn, z)
        torch.testing.assert_close(tok.denormalize_latents(zn), z, rtol=0, atol=1e-5)
    z = spatial_tok.latent_mean.view(-1, 1, 1) + spatial_tok.latent_std.view(-1, 1, 1) * torch.randn(512, 4, 4, 4)
    zn = spatial_tok.normalize_latents(z)  # per channel of the grid: zero mean, unit std
    assert zn.mean(dim=(0, 2, 3)).abs().max() < 0.05 and (zn.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05


@pytest.mark.parametrize("shape, tokens", [((32, 8), 32), ((4, 8, 8), 16)])
def test_both_latent_shapes(shape, tokens):
    model = randomised(build_generator(TINY_GEN, shape))
    assert model.num_tokens == tokens  # a grid is patchified 2 x 2
    x = torch.randn(3, *shape)
    assert model(x, torch.rand(3)).shape == x.shape
    assert torch.equal(model.from_tokens(model.to_tokens(x)), x)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="generator.patch_size"):
        build_generator(GeneratorConfig(width=32, heads=2, patch_size=3), (4, 8, 8))
    with pytest.raises(ValueError, match="generator.heads"):
        GeneratorConfig(width=32, heads=3)


@pytest.mark.parametrize("shape", [(32, 8), (4, 8, 8)])
def test_knows_absolute_positions(shape):
    """RoPE sees only relative positions: a latent whose tokens are all equal would give every token the same
    velocity, yet a tokenizer's tokens differ in their statistics by index. The learnt position embedding
    gives the same token different velocities at different places; without it they are all equal."""
    model = randomised(build_generator(TINY_GEN, shape))
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)
        token = torch.randn(1, 1, model.to_tokens(torch.zeros(1, *shape)).shape[-1])
        x = model.from_tokens(token.expand(2, model.num_tokens, -1).contiguous())  # one token everywhere
        spread = lambda: (model.to_tokens(model(x, torch.full((2,), 0.5))).std(dim=1)).min()  # noqa: E731
        assert spread() > 1e-3
        model.pos_embed.zero_()
        assert spread() < 1e-5


def test_flops_per_forward_and_per_sampling():
    model = build_generator(TINY_GEN.__class__(**{**TINY_GEN.__dict__, "num_classes": 10}), (4, 8, 8))
    one = generator_flops(model)
    x, t, y = torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    assert one == count_flops(model, x, t, y) > 0  # the meta copy counts what the real module runs
    assert generator_flops(model, batch=2) == 2 * one
    assert sampling_flops(model, steps=10, guidance=1.0) == 10 * one
    assert sampling_flops(model, steps=10, guidance=1.5, batch=3) == 10 * generator_flops(model, batch=6)
    xl = load_gen_config("gen-xl").generator
    with torch.device("meta"):
        big = build_generator(xl, (128, 32))
    assert sum(p.numel() for p in big.parameters()) == pytest.approx(675e6, rel=0.01)  # DiT-XL/2's size


def test_sampling_is_deterministic_per_seed():
    model = randomised(build_generator(GeneratorConfig(width=32, depth=2, heads=2, mlp_hidden=64, num_classes=3),
                                       (8, 4)))
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a = sample_latents(model, 4, steps=3, guidance=2.0, class_labels=1, generator=gen(0))
    assert a.shape == (4, 8, 4) and torch.isfinite(a).all()
    assert torch.equal(a, sample_latents(model, 4, steps=3, guidance=2.0, class_labels=1, generator=gen(0)))
    assert not torch.allclose(a, sample_latents(model, 4, steps=3, guidance=2.0, class_labels=1, generator=gen(1)))
    assert not torch.allclose(a, sample_latents(model, 4, steps=3, guidance=1.0, class_labels=1, generator=gen(0)))
    batches = []
    hook = model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    null = sample_latents(model, 4, steps=3, guidance=0.0, class_labels=1, generator=gen(0))
    hook.remove()
    assert batches == [4, 4, 4] and sampling_flops(model, steps=3, guidance=0.0) == 3 * generator_flops(model)
    assert torch.equal(null, sample_latents(model, 4, steps=3, guidance=0.0, class_labels=2, generator=gen(0)))
    per_sample = lambda n: sample_latents(model, n, steps=3, generator=image_generators(0, range(n)))  # noqa: E731
    assert torch.equal(per_sample(2), per_sample(3)[:2])  # random classes too: sample i depends on i alone
    with pytest.raises(ValueError, match="--class-label"):
        sample_latents(model, 4, steps=3, class_labels=3, generator=gen(0))
    with pytest.raises(ValueError, match="--steps"):
        sample_latents(model, 4, steps=0, generator=gen(0))
    unconditional = randomised(build_generator(TINY_GEN, (8, 4)))
    with pytest.raises(ValueError, match="unconditional"):
        sample_latents(unconditional, 4, steps=3, guidance=2.0, generator=gen(0))


def test_the_loss_and_the_sampler_are_flow_matching_done_by_hand():
    """The module docstring's convention, rebuilt from the same draws: x_t = (1 - t) x0 + t n with t ~ U(0, 1), the
    loss MSE(v, n - x0), a share `label_dropout` of the labels (a uniform draw below it) replaced by the null class;
    sampling from pure noise with Euler steps x += (t_next - t) v at t_i = 1 - i/N, the velocity guided as v_null +
    g (v_label - v_null)."""
    from msdd.flow.path import randn

    model = randomised(build_generator(GeneratorConfig(width=32, depth=2, heads=2, mlp_hidden=64, num_classes=3),
                                       (8, 4)))
    assert model.null_class == 3 and model.y_embed.num_embeddings == 4  # K classes and the null one
    x0 = torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    losses = {}
    for dropout in (0.0, 0.5, 1.0):
        got = flow_matching_loss(model, x0, labels, torch.Generator().manual_seed(7), label_dropout=dropout)
        g = torch.Generator().manual_seed(7)
        noise, t = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
        kept = labels if dropout == 0 else torch.where(torch.rand(4, generator=g) < dropout, 3, labels)
        with torch.no_grad():
            v = model((1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise, t, kept)
        losses[dropout] = got.item()
        assert got.item() == pytest.approx(F.mse_loss(v, noise - x0).item(), rel=1e-6), dropout
    assert len(set(losses.values())) == 3
    assert flow_matching_loss(model, x0, labels, torch.Generator().manual_seed(7)).item() == losses[0.0]  # no dropout
    for steps, guidance in ((1, 1.0), (3, 2.0)):
        got = sample_latents(model, 2, steps, guidance, class_labels=[2, 0], generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        x = randn((2, 8, 4), g, x0)
        with torch.no_grad():
            for i in range(steps):
                t = 1 - i / steps
                v = model(x, torch.full((2,), t), torch.tensor([2, 0]))
                if guidance != 1:
                    v_null = model(x, torch.full((2,), t), torch.tensor([3, 3]))
                    v = v_null + guidance * (v - v_null)
                x = x - v / steps
        torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    seed0 = sample_latents(model, 2, 3, 2.0, [2, 0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_latents(model, 2, 3, 2.0, [2, 0]), seed0)  # no generator: seed 0's draws


def test_generated_images_are_deterministic_for_both_tokenizers(shipped, spatial_tok):
    for tok in (shipped, spatial_tok):
        model = randomised(build_generator(TINY_GEN, tok.config.latent_shape))
        run = lambda seed: generate_images(model, tok, 2, steps=2,  # noqa: E731
                                           generator=torch.Generator().manual_seed(seed))
        x = run(0)
        assert x.shape == (2, 3, tok.config.image_size, tok.config.image_size) and x.abs().max() <= 1
        assert torch.equal(x, run(0)) and not torch.equal(x, run(1))
        assert torch.equal(generate_images(model, tok, 2, steps=2), x)  # no generator: seed 0's draws
    with pytest.raises(ValueError, match="--tokenizer"):
        generate_images(model, shipped, 2, steps=2)


def test_generated_latents_are_denormalised_before_decoding():
    """The generator samples normalised latents; `generate` decodes them in the tokenizer's own latent
    space (tok.denormalize_latents). The shipped student's statistics are nearly the identity, so they are set far
    from it here (spatial_tok's random decoder ignores its latent); the images must then equal the hand-made
    denormalise-then-decode, and differ from decoding the normalised latents as they are. `generate_images` gives
    the same images; its `return_latents=True` is `generate`'s deprecated form."""
    tok = Tokenizer.from_pretrained()  # a decoder that uses its latent; its own copy, not `shipped`
    tok.latent_mean.copy_(torch.linspace(-1.0, 1.0, 8))
    tok.latent_std.copy_(torch.linspace(0.5, 2.0, 8))
    model = randomised(build_generator(TINY_GEN, tok.config.latent_shape))
    images, z = generate(model, tok, 2, steps=2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws: the latents' noise, then the decoder's
    assert torch.equal(z, sample_latents(model, 2, steps=2, generator=g))
    state = g.get_state()
    torch.testing.assert_close(images, tok.decode(tok.denormalize_latents(z), generator=g), rtol=0, atol=0)
    g.set_state(state)
    assert (images - tok.decode(z, generator=g)).abs().mean() > 0.05
    assert torch.equal(generate_images(model, tok, 2, steps=2, generator=torch.Generator().manual_seed(0)), images)
    with pytest.warns(DeprecationWarning, match=r"generate\(\.\.\.\) returns the images and their latents") as caught:
        old = generate_images(model, tok, 2, steps=2, generator=torch.Generator().manual_seed(0), return_latents=True)
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller
    assert torch.equal(old.images, images) and torch.equal(old.latents, z)


# ---------------------------------------------------------------------------------------------
# training


def test_training_latents_are_the_normalised_encodings(spatial_tok):
    """The generator trains on normalised latents (the space `generate_images` denormalises from): each image's
    `tok.normalize_latents(tok.encode(x))`, then its mirror image's, for the images `image_records` reads."""
    data = GenDataConfig(images=4)
    got = encode_latents(spatial_tok, data, seed=3)
    records = image_records(data, spatial_tok.config.image_size, 3)
    x = torch.stack([records[i][0] for i in range(len(records))])
    raw = torch.cat([spatial_tok.encode(x), spatial_tok.encode(x.flip(-1))])
    assert got.latents.shape == (8, 4, 4, 4) and got.labels is None
    torch.testing.assert_close(got.latents, spatial_tok.normalize_latents(raw), rtol=0, atol=1e-6)
    assert not torch.allclose(got.latents, raw, atol=0.1)  # the statistics are far from the identity


def test_training_drives_the_loss_down(tmp_path, shipped):
    """100 steps on 16 latents of the shipped tokenizer (8 embedded crops and their mirror images). The loss
    starts at that of v = 0 (the zero output layer) and falls to about 0.69 of it (seed 0; 0.67-0.78 over
    seeds 0-2 and 4 or 8 crops); a model that learns from them (memorises 16 points) goes lower with more steps."""
    cfg = load_gen_config("gen-tiny", ["generator.width=64", "generator.depth=2", "generator.heads=2",
                                       "generator.mlp_hidden=128", "data.images=8", "train.batch_size=16",
                                       "train.lr=3e-3", "train.warmup_steps=10", "train.max_steps=100",
                                       "train.log_every=1", "train.ckpt_every=1000", "train.grid_every=1000"])
    trainer = GeneratorTrainer(cfg, "tiny-64", tmp_path / "run")
    assert trainer.data.latents.shape == (16, 32, 8) and trainer.data.labels is None
    summary = trainer.fit(progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert summary["steps"] == 100 and len(losses) == 100
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert end < 0.85 * start, (start, end)
    model, meta = load_generator(tmp_path / "run" / "model")
    assert meta["latent_shape"] == [32, 8] and meta["steps_trained"] == 100 and meta["tokenizer"] == "tiny-64"
    assert model.config == cfg.generator and (tmp_path / "run" / "grids" / "step_00000100.png").is_file()


def test_trains_on_the_grid_latent_of_an_ssdd_tokenizer(tmp_path, spatial_tok):
    cfg = load_gen_config("gen-tiny", [*TINY_SET, "train.grid_every=1000"])
    trainer = GeneratorTrainer(cfg, tmp_path / "ssdd", tmp_path / "run")
    assert trainer.data.latents.shape == (16, 4, 4, 4)
    trainer.fit(max_steps=2, progress=False)
    model, _ = load_generator(tmp_path / "run" / "model")
    assert model.latent_shape == (4, 4, 4) and model.num_tokens == 4


# ---------------------------------------------------------------------------------------------
# command line


def test_gen_train_then_generate(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "samples"
    assert main(["gen-train", "--tokenizer", "tiny-64", "--run-dir", str(run), "--max-steps", "2", *gen_args()]) == 0
    assert main(["gen-train", "--tokenizer", "tiny-64", "--run-dir", str(run), "--max-steps", "3", *gen_args()]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["gen-train", "--tokenizer", "tiny-64", "--run-dir", str(run), "--max-steps", "4",
                 *gen_args("generator.depth=3")]) == 2
    assert "generator.depth" in capsys.readouterr().err
    generate = ["generate", "--generator", str(run / "model"), "--tokenizer", "tiny-64", "--steps", "2"]
    assert main([*generate, "--n", "5", "--out", str(out), "--batch-size", "3"]) == 0
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (64, 64)
    assert Image.open(out / "grid.png").size == (3 * 66 + 2, 2 * 66 + 2)  # 3 columns, 2 rows, 2 px padding
    first = np.asarray(Image.open(pngs[0]))
    assert main([*generate, "--n", "5", "--out", str(tmp_path / "again")]) == 0  # same seed, other batches
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "images" / "00000.png")))
    # the student's teacher has its encoder and latent statistics: no warning (was: "its weights differ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*generate[:3], "--tokenizer", "tiny-64-teacher", "--steps", "2", "--n", "1",
                     "--out", str(tmp_path / "t")]) == 0
    other = tmp_path / "other-tok"
    Tokenizer(Tokenizer.from_pretrained("tiny-64").config).save_pretrained(other)  # the same shapes, new weights
    with pytest.warns(UserWarning, match="does not have the latent space this generator was trained on"):
        assert main([*generate[:3], "--tokenizer", str(other), "--steps", "2", "--n", "1",
                     "--out", str(tmp_path / "o")]) == 0
    # --metrics offline: latent FD against crops of the embedded photos; FID skipped for want of Inception
    capsys.readouterr()
    missing = tmp_path / "no-inception.pth"
    with pytest.warns(UserWarning, match="latent FD from 6 samples of 256-dim latents: the covariances are rank"):
        assert main([*generate, "--n", "6", "--out", str(tmp_path / "m"), "--metrics", "--inception-weights",
                     str(missing)]) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["samples"] == metrics["data_images"] == 6 and metrics["latent_dims"] == 32 * 8
    assert min(metrics["latent_fd"], metrics["latent_fd_gaussian_baseline"], metrics["latent_fd_data_floor"]) > 0
    assert "fid" not in metrics and str(missing) in metrics["fid_skipped"]
    assert "latent FD" in capsys.readouterr().out
    assert main([*generate, "--n", "2", "--seed", "3", "--out", str(tmp_path / "m")]) == 2  # was: 2 new, 4 old kept
    assert f"--out {tmp_path / 'm'} holds an earlier run's samples (6 PNGs in images/ and metrics.json)" in \
        capsys.readouterr().err
    assert main([*generate, "--n", "1", "--metrics", "--out", str(tmp_path / "one")]) == 2  # was: latent FD NaN
    assert "--metrics with --n 1: the latent FD needs at least 2 samples" in capsys.readouterr().err


def test_frechet_distance_against_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    from msdd.generator.quality import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) * 2 + 1
    ours = frechet_distance(a, b)
    ref = _compute_fid(a.double().mean(0), torch.cov(a.double().T), b.double().mean(0), torch.cov(b.double().T))
    assert ours == pytest.approx(float(ref), rel=1e-6) and ours > 1
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("extra, match", [
    (["--cfg", "2"], "unconditional"),
    (["--class-label", "1"], "unconditional"),
    (["--n", "0"], "--n"),
    (["--steps", "0"], "--steps"),
])
def test_generate_bad_inputs(tmp_path, capsys, extra, match):
    run = tmp_path / "run"
    assert main(["gen-train", "--tokenizer", "tiny-64", "--run-dir", str(run), "--max-steps", "1", *gen_args()]) == 0
    capsys.readouterr()
    args = ["generate", "--generator", str(run / "model"), "--tokenizer", "tiny-64", "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_generate_writes_the_samples_of_the_api_and_their_metrics(tmp_path, capsys):
    """`msdd generate` writes what `generate` gives for the same seed, steps and guidance (sample i from
    `image_generators(seed, [i])`, in the command's batches), and --metrics is `sample_metrics` of those samples
    against 2n data images drawn with seed + 1, split in halves, the N(0, I) baseline drawn with the seed, recorded
    with the command's settings. A generator saved before `latent_space_sha256` is checked by its tokenizer's file."""
    from msdd.generator.quality import data_images, sample_metrics

    run = tmp_path / "run"
    assert main(["gen-train", "--tokenizer", "tiny-64", "--run-dir", str(run), "--max-steps", "1", *gen_args()]) == 0
    model, meta = load_generator(run / "model")
    torch.manual_seed(0)
    randomised(model)  # samples that depend on the steps and the seed
    resaved(model, meta, tmp_path / "gen")
    capsys.readouterr()
    out, missing = tmp_path / "out", tmp_path / "no-inception.pth"
    with pytest.warns(UserWarning, match="latent FD from 5 samples"):
        assert main(["generate", "--generator", str(tmp_path / "gen"), "--tokenizer", "tiny-64", "--n", "5", "--steps",
                     "3", "--seed", "7", "--batch-size", "2", "--out", str(out), "--metrics", "--inception-weights",
                     str(missing)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"5 samples (3 steps, cfg 1, seed 7) written to {out / 'images'}; grid "
                              f"{out / 'grid.png'}\nlatent FD ")
    tok = Tokenizer.from_pretrained("tiny-64")
    parts = [generate(model, tok, len(b), 3, 1.0, None, image_generators(7, b)) for b in (range(2), range(2, 4), [4])]
    images, latents = torch.cat([p.images for p in parts]), torch.cat([p.latents for p in parts])
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(sample_pixels(out), as_pixels(images), strict=True))
    data = data_images("embedded", 10, 64, 8)
    expected = sample_metrics(images, latents, tok, data[:5], data[5:], torch.Generator().manual_seed(7), missing)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"generator": str(tmp_path / "gen"), "tokenizer": "tiny-64", "steps": 3, "cfg": 1.0, "seed": 7,
                       "data": "embedded", **{k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v
                                              for k, v in expected.items()}}
    assert f"latent FD {metrics['latent_fd']:.2f} (N(0, I) latents: {metrics['latent_fd_gaussian_baseline']:.2f}, " \
           f"other data images: {metrics['latent_fd_data_floor']:.2f}) over 256 dims; FID skipped (" in printed
    # an older generator: no latent_space_sha256, so the tokenizer's weights file is compared
    resaved(model, meta, tmp_path / "old", drop=("latent_space_sha256",))
    one = ["generate", "--generator", str(tmp_path / "old"), "--n", "1", "--steps", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*one, "--tokenizer", "tiny-64", "--out", str(tmp_path / "o1")]) == 0
    with pytest.warns(UserWarning, match="--tokenizer tiny-64-teacher is not the tokenizer this generator was trained"):
        assert main([*one, "--tokenizer", "tiny-64-teacher", "--out", str(tmp_path / "o2")]) == 0


def test_generate_refuses_a_tokenizer_as_generator(tmp_path, capsys):
    from msdd.hub import BUNDLED

    assert main(["generate", "--generator", str(BUNDLED["tiny-64"]), "--tokenizer", "tiny-64",
                 "--out", str(tmp_path / "o")]) == 2
    assert "pass it as --tokenizer" in capsys.readouterr().err
    assert main(["generate", "--generator", str(tmp_path / "nope"), "--tokenizer", "tiny-64",
                 "--out", str(tmp_path / "o")]) == 2
    assert "gen-train" in capsys.readouterr().err


def test_class_conditional_from_class_subfolders(tmp_path, capsys):
    from msdd.data import load_photo

    data = tmp_path / "classes"
    for name in ("coffee", "astronaut"):
        (data / name).mkdir(parents=True)
        for j, (y, x) in enumerate([(0, 0), (120, 140), (200, 60), (40, 220)]):
            crop = np.ascontiguousarray(load_photo(name)[y : y + 80, x : x + 80])
            Image.fromarray(crop).save(data / name / f"{j}.png")
    run = tmp_path / "run"
    common = ["gen-train", "--tokenizer", "tiny-64", "--run-dir", str(run), "--max-steps", "2"]
    assert main([*common, *gen_args(f"data.source={data}", "generator.num_classes=3")]) == 2
    assert "generator.num_classes=2" in capsys.readouterr().err
    assert main([*common, *gen_args(f"data.source={data}", "generator.num_classes=2")]) == 0
    model, meta = load_generator(run / "model")
    assert model.conditional and meta["class_names"] == ["astronaut", "coffee"]
    torch.manual_seed(0)
    resaved(randomised(model), meta, tmp_path / "gen")  # samples that depend on the class and the guidance
    args = ["generate", "--generator", str(tmp_path / "gen"), "--tokenizer", "tiny-64", "--n", "2", "--steps", "2"]
    with pytest.warns(UserWarning, match="latent FD from 2 samples"):
        assert main([*args, "--class-label", "1", "--cfg", "2", "--out", str(tmp_path / "o"), "--metrics", "--data",
                     str(data), "--inception-weights", str(tmp_path / "no-inception.pth")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (metrics["cfg"], metrics["data"], metrics["data_images"]) == (2.0, str(data), 2)
    tok = Tokenizer.from_pretrained("tiny-64")
    sampled = {(label, cfg): as_pixels(generate(model, tok, 2, 2, cfg, label, image_generators(0, range(2))).images)
               for label, cfg in ((1, 2.0), (0, 2.0), (1, 1.0))}
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    assert same(sample_pixels(tmp_path / "o"), sampled[1, 2.0])  # class 1 at guidance 2
    assert not same(sampled[0, 2.0], sampled[1, 2.0]) and not same(sampled[1, 1.0], sampled[1, 2.0])
    assert main([*args, "--class-label", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--class-label" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# files, metrics and the trainer's saved model, piece by piece


def test_written_samples_and_grid_hold_the_images_in_reading_order(tmp_path):
    """`write_samples`: images/0000i.png is image i as it is (not transposed: the images are not symmetric), and
    grid.png reads row by row on ceil(sqrt 5) = 3 columns, the sixth cell white."""
    from msdd.generator.files import write_samples

    images = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = np.asarray(Image.open(write_samples(images, tmp_path)).convert("RGB")).astype(int)
    assert grid.shape == (2 * 8 + 2, 3 * 8 + 2, 3)  # 2 rows, 3 columns of 6 px cells, 2 px padding
    written = sample_pixels(tmp_path)
    assert len(written) == 5
    for i, want in enumerate(as_pixels(images)):  # (R, R, 3)
        assert np.array_equal(written[i], want)
        y, x = 2 + (i // 3) * 8, 2 + (i % 3) * 8  # row i // 3, column i % 3
        assert np.abs(grid[y:y + 6, x:x + 6] - want).max() <= 1
    assert (grid[10:16, 18:24] == 255).all()  # the cell after the last image: white


def test_load_generator_refuses_a_newer_or_invalid_format_version(tmp_path):
    """A config.json of a later format (or a non-integer version) is refused with the upgrade hint, not read as
    if it were format 1; format 1 loads."""
    directory = save_generator(build_generator(TINY_GEN, (8, 4)), tmp_path / "g")
    meta = json.loads((directory / "config.json").read_text())
    assert load_generator(directory)[0].latent_shape == (8, 4)
    for version in (2, 0, True, "1"):
        (directory / "config.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(ValueError, match=f"format_version {version!r} is not one this msdd reads"):
            load_generator(directory)


def test_sample_metrics_compare_normalised_latents(spatial_tok, tmp_path):
    """`sample_metrics` compares the samples' normalised latents with the data images' normalised latents (the
    spatial tokenizer's statistics are far from the identity): samples that are the data images themselves, with
    their normalised latents, are at latent FD 0; the N(0, I) baseline draws its noise from `generator`; the
    floor compares the other data images' normalised latents (70 images each: more than one batch); FID is skipped,
    with the reason, without Inception."""
    from msdd.generator.quality import data_images, frechet_distance, sample_metrics

    data = data_images("embedded", 70, 32, seed=0)
    other = data_images("embedded", 70, 32, seed=1)
    assert data.shape == (70, 3, 32, 32) and not torch.equal(data, other)
    norm = lambda x: spatial_tok.normalize_latents(spatial_tok.encode(x))  # noqa: E731
    latents = norm(data)
    missing = tmp_path / "no-inception.pth"
    out = sample_metrics(data, latents, spatial_tok, data, other, torch.Generator().manual_seed(5), missing)
    assert out["samples"] == out["data_images"] == 70 and out["latent_dims"] == 64
    assert out["latent_fd"] == pytest.approx(0, abs=1e-3)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    assert out["latent_fd_gaussian_baseline"] == pytest.approx(frechet_distance(noise, latents), rel=1e-6)
    assert out["latent_fd_data_floor"] == pytest.approx(frechet_distance(norm(other), latents), rel=1e-6)
    assert out["latent_fd_gaussian_baseline"] > 1 and out["latent_fd_data_floor"] > 0
    assert "fid" not in out and str(missing) in out["fid_skipped"]


def test_trainer_saves_its_ema_generator(tmp_path, spatial_tok):
    """The saved model is the EMA generator, updated every step: after 3 steps it equals the trainer's EMA copy
    (not the raw weights it averages), and its zero-initialised output layer has learnt something. The tokenizer
    stays frozen, and the training grid shows the EMA generator's samples."""
    cfg = load_gen_config("gen-tiny", [*TINY_SET, "train.grid_every=1000", "data.images=4"])
    trainer = GeneratorTrainer(cfg, tmp_path / "ssdd", tmp_path / "run")
    trainer.fit(max_steps=3, progress=False)
    saved = load_generator(tmp_path / "run" / "model")[0].state_dict()
    for name, ema in trainer.ema.module.state_dict().items():
        assert torch.equal(saved[name], ema), name
    assert not torch.equal(saved["final.linear.weight"], trainer.model.state_dict()["final.linear.weight"])
    assert saved["final.linear.weight"].abs().max() > 0
    assert not any(p.requires_grad for p in trainer.tokenizer.parameters())  # frozen: it only encodes and decodes
    # the training grid: 16 samples of the EMA generator from seed 0, 25 steps without guidance, decoded (the output
    # layers of both randomised: the images then show the latents, and the latents the number of steps)
    randomised(trainer.ema.module)
    torch.nn.init.normal_(trainer.tokenizer.decoder.out_conv.weight, std=0.05)
    samples = generate_images(trainer.ema.module, trainer.tokenizer, 16, 25, 1.0, None,
                              torch.Generator().manual_seed(0))
    grid = trainer.save_grid()
    assert grid == tmp_path / "run" / "grids" / "step_00000003.png"
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(sample_grid(samples)))


def test_a_resumed_generator_run_trains_as_a_straight_one(tmp_path, spatial_tok):
    """4 steps of the latent generator in one run equal 2, a resume from their checkpoint and 2 more: the same logged
    losses, generator and EMA (a step's noise and times come from its seed, the latents' order from the stored data
    position: 6 latents in batches of 4 make every step a new epoch; the EMA's warm-up from its stored update count)."""
    cfg = load_gen_config("gen-tiny", [*TINY_SET, "train.grid_every=1000", "data.images=6", "train.batch_size=4"])
    straight, resumed = straight_and_resumed(
        lambda run, require_resume: GeneratorTrainer(cfg, tmp_path / "ssdd", run, require_resume=require_resume),
        tmp_path)
    assert len(open(tmp_path / "a" / "log.jsonl").readlines()) == 4
    assert_same_runs(tmp_path / "a", tmp_path / "b", ("loss", "grad_norm", "lr"),
                     {"model": (straight.model, resumed.model), "ema": (straight.ema.module, resumed.ema.module)})


def test_gen_config_bare_keys_and_label_dropout_bounds():
    """`--set depth=6` (a key outside the sections) sets generator.depth; label_dropout 1 (every label the null
    class: nothing conditional left to learn) is refused."""
    cfg = load_gen_config("gen-tiny", ["depth=6", "train.label_dropout=0.5"])
    assert cfg.generator.depth == 6 and cfg.train.label_dropout == 0.5
    with pytest.raises(ValueError, match="train.label_dropout"):
        load_gen_config("gen-tiny", ["train.label_dropout=1"])


def test_resume_refuses_another_tokenizers_latents(tmp_path, spatial_tok):
    """A run trained on one tokenizer's latents is not continued on another's of the same shapes (its weights'
    sha256 is in the checkpoint): the error names both hashes' prefixes and the way out."""
    from msdd.hub import file_sha256

    cfg = load_gen_config("gen-tiny", [*TINY_SET, "train.grid_every=1000", "data.images=4"])
    GeneratorTrainer(cfg, tmp_path / "ssdd", tmp_path / "run").fit(max_steps=2, progress=False)
    Tokenizer(spatial_tok.config).save_pretrained(tmp_path / "other")  # the same shapes, new weights
    other_hash = file_sha256(tmp_path / "other" / "model.safetensors")
    with pytest.raises(ValueError, match=f"another tokenizer's latents .*has {other_hash[:12]}"):
        GeneratorTrainer(cfg, tmp_path / "other", tmp_path / "run")


def test_conditional_training_drops_labels_to_the_null_class(tmp_path):
    """Classifier-free guidance needs the null class learnt: a class-conditional trainer's steps replace a share
    `train.label_dropout` of the labels by the null class (index num_classes = 2) and keep the others."""
    from msdd.data import load_photo

    data = tmp_path / "classes"
    for name in ("coffee", "astronaut"):
        (data / name).mkdir(parents=True)
        for j, (y, x) in enumerate([(0, 0), (120, 140)]):
            Image.fromarray(np.ascontiguousarray(load_photo(name)[y:y + 80, x:x + 80])).save(data / name / f"{j}.png")
    cfg = load_gen_config("gen-tiny", [*TINY_SET, f"data.source={data}", "generator.num_classes=2",
                                       "train.label_dropout=0.5", "train.grid_every=1000"])
    trainer = GeneratorTrainer(cfg, "tiny-64", tmp_path / "run")
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[2].tolist()))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two training micro-batches of the 8 latents (4 images and their mirror images)
        trainer.micro_step(torch.arange(8), g)
    labels = [y for batch in seen for y in batch]
    assert len(labels) == 16 and {0, 1, 2} <= set(labels)
    assert 2 <= labels.count(2) <= 14  # about half of them
