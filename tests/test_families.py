"""The model-family objects (`msdd.families`): the registry, `--steps` text, and the bench's decoders built
by a family at another resolution or stage count."""

import pytest
import torch

from msdd.config import FAMILIES
from msdd.eval.bench.models import FlowModel, at_resolution, single_scale_config
from msdd.families import REGISTRY, family_of, parse_steps

from conftest import assert_training_loss_follows_a_setting, tiny_config


def test_every_configurable_family_has_an_object():
    assert set(REGISTRY) == set(FAMILIES)
    for name in FAMILIES:
        config = tiny_config(f"model.family={name}").model
        assert family_of(config).name == name
        assert family_of(config).multi_scale == (name == "msdd")  # the one family decoding through stage windows


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


@pytest.mark.parametrize("setting, values", [
    ("t_sampling", ("uniform", "logit_normal")),
    ("loss_weighting", ("none", "stage", "sigmoid")),
    ("sigmoid_bias", (0.0, 1.5)),  # with loss_weighting=sigmoid
    ("loss_reduction", ("stage_sum", "sample_mean")),
    ("prediction", ("x", "v")),
    ("cfg_drop", (0.0, 0.5)),
    ("lpips_weight", (0.0, 0.5)),  # with a perceptual network (a stand-in: the mean absolute error per image)
])
def test_the_msdd_familys_loss_is_flow_loss_with_its_model_flow_settings(setting, values):
    """`Tokenizer.training_loss` of the msdd family is `flow_loss` given every model.flow setting: for each setting,
    two or three values give two or three different losses, each equal to flow_loss called with it by hand (so that
    a setting left out, or passed as a constant, is seen)."""
    from msdd import Tokenizer
    from msdd.flow.path import flow_loss

    extra = ("model.flow.loss_weighting=sigmoid",) if setting == "sigmoid_bias" else ()
    if setting in ("t_sampling", "loss_weighting", "sigmoid_bias"):
        extra += ("model.flow.prediction=v",)  # tiny-test's x-prediction loss is not weighted

    def make(value):
        tok = Tokenizer(tiny_config(*extra, f"model.flow.{setting}={value}").model)
        assert getattr(tok.config.flow, setting) == value
        with torch.no_grad():  # a decoder whose output depends on its input (its last layer starts at zero)
            for p in tok.decoder.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return tok

    def by_hand(tok, images, perceptual, generator):
        fc = tok.config.flow
        return flow_loss(tok.decoder, images, tok.encoder(images), tok.family.windows, t_sampling=fc.t_sampling,
                         loss_weighting=fc.loss_weighting, sigmoid_bias=fc.sigmoid_bias,
                         loss_reduction=fc.loss_reduction, prediction=fc.prediction, cfg_drop=fc.cfg_drop,
                         null_context=tok.decoder.null_context, perceptual=perceptual,
                         perceptual_weight=fc.lpips_weight, generator=generator)[0]

    assert_training_loss_follows_a_setting(make, values, by_hand)
