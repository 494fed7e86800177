"""Config round trips: every preset through to_dict -> from_dict (and through JSON, as config.json and the
checkpoints store it) comes back equal, field for field, with the declared types."""

import dataclasses
import json
import re
from importlib import resources

import pytest

from msdd.config import (Config, ModelConfig, config_from_json, from_dict, load_config, model_config_from_dict,
                         parse_override, preset_names, to_dict)


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


@pytest.mark.parametrize("override, field, message", [
    ("train.ema_decay=1.0", "train.ema_decay", "must be in [0, 1)"),  # 1: the EMA never moves
    ("distill.ema_decay=1", "distill.ema_decay", "must be in [0, 1)"),
    ("train.grad_clip=0", "train.grad_clip", "must be > 0"),  # 0: every step a zero update
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "must be in [0, 1]"),
    ("train.warmup_steps=-1", "train.warmup_steps", "must be >= 0"),
    ("train.betas=[0.9,1.0]", "train.betas", "needs two values in [0, 1)"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "must be >= 1, got 0"),
    ("distill.student_cfg_drop=1.0", "distill.student_cfg_drop", "must be in [0, 1)"),
    ("model.flow.cfg_drop=1.0", "model.flow.cfg_drop", "must be in [0, 1), got 1.0"),  # no conditional sample left
    ("data.limit=0", "data.limit", "must be >= 1 or null"),
    ("data.num_workers=-1", "data.num_workers", "must be >= 0"),
    ("train.max_steps=2.5", "train.max_steps", "expected an integer, got 2.5"),  # never truncated to 2
    ("train.max_steps=true", "train.max_steps", "expected an integer, got True"),
    ("train.bf16=1", "train.bf16", "expected true/false, got 1"),
    ("train.lr=true", "train.lr", "expected a number, got True"),
])
def test_a_value_out_of_range_names_its_field(override, field, message):
    """Each bound of the training sections, and the types of `--set` values: a ValueError naming the full field
    and the range, not a run that fails (or quietly does something else) later."""
    with pytest.raises(ValueError, match=rf"invalid config value for `{re.escape(field)}`: {re.escape(message)}"):
        load_config("tiny-test", [override])


def test_the_edges_of_each_range_are_accepted():
    """The closed ends of the ranges above are valid values, and a whole float is taken as an int."""
    cfg = load_config("tiny-test", ["train.ema_decay=0", "train.min_lr_ratio=1", "train.warmup_steps=0",
                                    "train.betas=[0,0.999]", "train.keep_checkpoints=1", "distill.student_cfg_drop=0",
                                    "model.flow.cfg_drop=0", "data.limit=1", "data.num_workers=0",
                                    "train.max_steps=3.0", "train.bf16=true"])
    assert cfg.train.max_steps == 3 and type(cfg.train.max_steps) is int and cfg.data.limit == 1
    assert cfg.train.min_lr_ratio == 1.0 and cfg.train.betas == (0.0, 0.999) and cfg.train.bf16 is True
    assert load_config("tiny-test", ["train.min_lr_ratio=0", "data.limit=null"]).data.limit is None


def test_set_splits_at_the_first_equals_sign_and_defaults_to_the_model_section():
    """`--set KEY=VALUE`: the value is everything after the first `=` (a path may hold one), parsed as YAML; a key
    outside the four sections belongs to `model`."""
    assert parse_override("data.source=/photos/a=b") == ("data.source", "/photos/a=b")
    assert parse_override("decoder.depth=4") == ("model.decoder.depth", 4)
    assert parse_override("train.betas=[0.8, 0.9]") == ("train.betas", [0.8, 0.9])
    assert load_config("tiny-test", ["data.source=/photos/a=b", "decoder.depth=3"]).data.source == "/photos/a=b"
    with pytest.raises(ValueError, match=r"invalid override 'train\.lr': expected KEY=VALUE"):
        parse_override("train.lr")
