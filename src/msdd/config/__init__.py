"""Configuration: frozen dataclasses that validate themselves, YAML presets and `--set` overrides.

A run is described by one `Config` with four sections:

    model    what is saved with a tokenizer (family, image size, latent shape, encoder, decoder, flow,
             sampling, and the `ssdd` section of the SSDD family)
    train    stage-1 optimisation (batch, lr schedule, EMA, checkpoints, logging)
    distill  stage-2 one-step-per-scale distillation
    data     where training and evaluation images come from

Presets live in `msdd/configs/<name>.yaml` (also reachable as `configs/` at the repository root).
Overrides use dotted paths, e.g. `model.decoder.depth=4`; the `model.` prefix may be left out
(`decoder.depth=4`). Values are parsed as YAML scalars/lists (`4`, `1e-4`, `[30,30,30]`, `true`).

Every section checks itself when built (`__post_init__`, so `dataclasses.replace` checks again) and names
a bad field by its dotted path: each section class sits at one place in a `Config`, its `section`. Checks
that need two sections (steps per stage, patch sizes against the image size) are the model section's.

    model.py    the `model` section and its subsections
    run.py      `train`, `distill`, `data` and `Config`
    dicts.py    dataclasses to and from dicts; `diff_fields`
    presets.py  presets, overrides, `load_config`
"""

from msdd.config.dicts import diff_fields, from_dict, to_dict
from msdd.config.model import (
    FAMILIES,
    POS_SCHEMES,
    SSDD_LATENT_FACTOR,
    DecoderConfig,
    EncoderConfig,
    FlowConfig,
    ModelConfig,
    SamplingConfig,
    SSDDConfig,
    TransformerConfig,
)
from msdd.config.presets import config_from_json, load_config, model_config_from_dict, parse_override, preset_names
from msdd.config.run import Config, DataConfig, DistillConfig, TrainConfig

__all__ = [
    "FAMILIES", "POS_SCHEMES", "SSDD_LATENT_FACTOR", "Config", "DataConfig", "DecoderConfig", "DistillConfig",
    "EncoderConfig", "FlowConfig", "ModelConfig", "SSDDConfig", "SamplingConfig", "TrainConfig",
    "TransformerConfig", "config_from_json", "diff_fields", "from_dict", "load_config", "model_config_from_dict",
    "parse_override", "preset_names", "to_dict",
]
