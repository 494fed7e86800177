"""The model-family objects (`msdd.families`): the registry, `--steps` text, and the bench's decoders built
by a family at another resolution or stage count."""

import pytest
import torch

from msdd.config import FAMILIES
from msdd.eval.bench.models import FlowModel, at_resolution, single_scale_config
from msdd.families import REGISTRY, family_of, parse_steps

from conftest import tiny_config


def test_every_configurable_family_has_an_object():
    assert set(REGISTRY) == set(FAMILIES)
    for name in FAMILIES:
        config = tiny_config(f"model.family={name}").model
        assert family_of(config).name == name


def test_parse_steps():
    assert parse_steps(None) is None and parse_steps("10") == 10 and parse_steps("1,2,3") == [1, 2, 3]
    with pytest.raises(ValueError, match="--steps 'a,b'"):
        parse_steps("a,b")


def test_passes_per_image_doubles_only_guided_msdd_steps():
    msdd, plain = (family_of(tiny_config(f"model.family={f}").model) for f in ("msdd", "plain"))
    assert msdd.passes_per_image((2, 1, 3), 2.0) == 12 and msdd.passes_per_image((2, 1, 3), 1.0) == 6
    assert plain.passes_per_image(plain.resolve_steps([5, 5, 5]), plain.resolve_guidance(2.0)) == 1


def test_bench_decoder_at_another_resolution_shares_the_weights_it_can():
    """A linear-path decoder at half the resolution: every weight the same object except the map to R x R
    pixels, which is a fresh decoder's (zeros); a single-scale copy shares all and gets its own windows."""
    config = tiny_config().model
    model = FlowModel.random(config, torch.device("cpu"))
    half = model.with_config(at_resolution(config, config.image_size // 2))
    own = dict(model.decoder.named_parameters())
    for name, p in half.decoder.named_parameters():
        if name.startswith("from_linear."):
            assert p.shape != own[name].shape and not p.any()
        else:
            assert p is own[name], name
    single = model.with_config(single_scale_config(config, 4, 1.0))
    assert all(p is own[n] for n, p in single.decoder.named_parameters())
    assert [w.resolution for w in single.family.windows] == [config.image_size]
    assert list(single.decoder.windows) == [config.image_size]


def test_plain_family_trains_on_the_mse_of_the_decode_it_gives():
    """The plain autoencoder baseline's stage-1 loss is the MSE between its one decode (the image `sample` returns)
    and the real images, plus flow.lpips_weight times the perceptual term when a perceptual network is given (a
    stand-in here: the mean absolute error per image)."""
    from msdd import Tokenizer

    tok = Tokenizer(tiny_config("model.family=plain", "model.flow.lpips_weight=0.5").model)
    with torch.no_grad():  # a decoder whose output depends on the latents (its last layer starts at zero)
        for p in tok.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = tok.encoder(images)
        x, _ = tok.family.sample(tok.decoder, z, (1,), 1.0, None)
        loss, terms = tok.family.loss(tok.decoder, images, z, None)
        mse = (x - images).pow(2).mean()
        torch.testing.assert_close(loss, mse)
        assert set(terms) == {"loss_mse"}
        stand_in = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731
        with_perc, terms = tok.family.loss(tok.decoder, images, z, None, perceptual=stand_in)
        torch.testing.assert_close(with_perc, mse + 0.5 * (x - images).abs().mean())
        assert set(terms) == {"loss_mse", "loss_lpips"}
