"""Presets (`msdd/configs/<name>.yaml`, which may extend another with `base:`), `--set` overrides and
configs stored as JSON."""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources
from typing import Any

import yaml

from msdd.config.dicts import from_dict
from msdd.config.model import ModelConfig
from msdd.config.run import Config


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data, "model")


def preset_names() -> list[str]:
    files = resources.files("msdd").joinpath("configs").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _preset_dict(name: str) -> dict:
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; available presets: {preset_names()}")
    return _yaml_tree(resources.files("msdd").joinpath("configs", f"{name}.yaml").read_text(), f"preset {name}")


def _yaml_tree(text: str, where: str) -> dict:
    """The mapping a preset file holds, or a ValueError naming the file and what is wrong."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ValueError(f"{where} holds a YAML {type(tree).__name__}, not a mapping of config sections "
                         f"(model:, train:, distill:, data:; see configs/tiny-64.yaml)")
    return tree


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for dotted "a.b.c", creating sections on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"invalid override `{dotted}`: `{k}` is not a section")
    node[keys[-1]] = value


def parse_override(text: str, sections: set[str] | None = None, default: str = "model",
                   example: str = "model.decoder.depth=4") -> tuple[str, Any]:
    """`KEY=VALUE` -> (dotted key, YAML value); a key whose first part is not one of `sections` (default: the
    run config's) belongs to the `default` section."""
    if "=" not in text:
        raise ValueError(f"invalid override {text!r}: expected KEY=VALUE, e.g. {example}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"invalid override {text!r}: value is not valid YAML ({' '.join(str(e).split())}); "
                         f"write KEY=VALUE with a YAML value, e.g. {example}") from None
    if key.split(".")[0] not in (sections or {f.name for f in fields(Config)}):
        key = f"{default}.{key}"  # `decoder.depth=4` means `model.decoder.depth=4`
    return key, value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated `Config` from a preset name (or a YAML file path) and `KEY=VALUE` overrides."""
    if preset.endswith((".yaml", ".yml")):
        try:
            text = open(preset).read()
        except OSError as e:
            raise ValueError(f"--preset {preset}: cannot read it ({e.strerror})") from None
        tree = _yaml_tree(text, preset)
    else:
        tree = _preset_dict(preset)
    chain = [preset]
    while "base" in tree:  # presets may extend another preset, which may extend another
        base = tree.pop("base")
        if not isinstance(base, str) or base in chain:
            raise ValueError(f"--preset {preset}: `base: {base}` must name a preset (such as tiny-64) not already in "
                             f"its chain {chain}")
        chain.append(base)
        tree = _merge(_preset_dict(base), tree)
    tree.setdefault("name", preset)
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    return from_dict(Config, tree)


def config_from_json(text: str) -> Config:
    return from_dict(Config, json.loads(text))
