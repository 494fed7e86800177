"""Config round trips: every preset through to_dict -> from_dict (and through JSON, as config.json and the
checkpoints store it) comes back equal, field for field, with the declared types."""

import dataclasses
import json
from importlib import resources

import pytest

from msdd.config import (Config, ModelConfig, config_from_json, from_dict, load_config, model_config_from_dict,
                         preset_names, to_dict)


def test_preset_names_are_the_shipped_yaml_files():
    files = {f.name[: -len(".yaml")] for f in resources.files("msdd").joinpath("configs").iterdir()
             if f.name.endswith(".yaml")}
    assert set(preset_names()) == files
    assert {"tiny-64", "paper-256", "paper-256-s3", "paper-256-single", "paper-512", "ssdd-m-256",
            "ssdd-tiny-64"} <= files


def _tuples_stay_tuples(a, b, where="config"):
    """Field by field: equal values of the same type (a list where a tuple was is a different config)."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _tuples_stay_tuples(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_to_dict_and_from_dict(name):
    cfg = load_config(name)
    d = to_dict(cfg)
    assert d == cfg.to_dict()
    back = from_dict(Config, d)
    assert back == cfg
    _tuples_stay_tuples(cfg, back)
    via_json = config_from_json(json.dumps(d))  # what a checkpoint / config.json holds
    assert via_json == cfg
    _tuples_stay_tuples(cfg, via_json)
    model = model_config_from_dict(json.loads(json.dumps(d["model"])))
    assert model == cfg.model and isinstance(model, ModelConfig)
    assert to_dict(back) == d  # and the dict of the copy is the same dict


def test_round_trip_keeps_overrides_and_a_changed_field_is_seen():
    cfg = load_config("tiny-64", ["model.sampling.steps=[3,1,2,5]", "train.betas=[0.8,0.95]", "distill.cfg=1.5"])
    back = from_dict(Config, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg and back.model.sampling.steps == (3, 1, 2, 5) and back.train.betas == (0.8, 0.95)
    d = to_dict(cfg)
    d["model"]["decoder"]["depth"] += 1
    assert from_dict(Config, d) != cfg


def test_dataclasses_replace_revalidates_and_errors_name_the_full_field():
    cfg = load_config("tiny-64")
    with pytest.raises(ValueError, match=r"invalid config value for `model\.encoder\.depth`: must be >= 1, got 0"):
        dataclasses.replace(cfg.model.encoder, depth=0)
    with pytest.raises(ValueError, match=r"`model\.flow\.gamma`: must be in \(0, 1/3\] \(the block noise.*got 0\.34"):
        dataclasses.replace(cfg.model.flow, gamma=0.34)  # accepted before, then every decode failed (SPEC 6)
    assert dataclasses.replace(cfg.model.flow, gamma=1 / 3).gamma == 1 / 3
    with pytest.raises(ValueError, match=r"`train\.lr`: must be > 0"):
        dataclasses.replace(cfg.train, lr=0.0)
    # checks across sections belong to the model section, which names the field to fix
    with pytest.raises(ValueError, match=r"`model\.sampling\.steps`: needs one entry per stage \(3\), got \[10, 10"):
        dataclasses.replace(cfg.model, flow=dataclasses.replace(cfg.model.flow, num_stages=3))
    with pytest.raises(ValueError, match=r"`model\.encoder\.patch_size`: image_size 60 must be divisible"):
        dataclasses.replace(cfg.model, image_size=60)
    ssdd = load_config("ssdd-tiny-64").model
    with pytest.raises(ValueError, match=r"`model\.ssdd\.channel_mults`: image_size 72 must be divisible by 8 .* 16"):
        dataclasses.replace(ssdd, image_size=72, ssdd=dataclasses.replace(ssdd.ssdd, channel_mults=(1, 2, 4, 8, 8)))
    assert dataclasses.replace(cfg.model, image_size=128).stage_resolutions == (16, 32, 64, 128)
