"""Model families (`model.family`) as objects: `family_of(config)` gives the one that builds, decodes,
trains and counts that config's model. A new family is one module with a `Family` subclass, listed here
(`REGISTRY`) and in `msdd.config.FAMILIES` (with `ModelConfig.family`'s Literal).

    msdd   token encoder + multi-scale MMDiT flow decoder (SPEC 3-6); steps per stage, guidance
    ssdd   token or f8 conv encoder + U-Net/transformer flow decoder at full resolution (SPEC 10)
    plain  token encoder + the msdd decoder network used once: a deterministic autoencoder baseline
"""

from __future__ import annotations

from msdd.config import ModelConfig
from msdd.families.base import Decoded, Family, parse_steps
from msdd.families.msdd import MSDDFamily
from msdd.families.plain import PlainFamily
from msdd.families.ssdd import SSDDFamily

REGISTRY: dict[str, type[Family]] = {f.name: f for f in (MSDDFamily, SSDDFamily, PlainFamily)}


def family_of(config: ModelConfig) -> Family:
    """The family object of `config` (`config.family` is validated against the registry's names)."""
    try:
        return REGISTRY[config.family](config)
    except KeyError:
        raise ValueError(f"model.family: unknown family {config.family!r}; expected one of {list(REGISTRY)}") from None


__all__ = ["REGISTRY", "Decoded", "Family", "family_of", "parse_steps"]
