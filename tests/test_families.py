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
