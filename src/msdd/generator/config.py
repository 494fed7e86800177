"""The latent generator's config: the network (`generator`, saved with it), its training (`train`) and the
images it learns from (`data`), with the named presets and `--set` overrides of `msdd gen-train`.

Presets (`PRESETS`, the choices of `--preset`):

    gen-tiny  width 128, depth 4, 4 heads (1.3M parameters): trains on the embedded photos' latents on a CPU in
              minutes
    gen-xl    DiT-XL/2 / SiT-XL size (width 1152, depth 28, 16 heads; SwiGLU hidden 3072, the parameters of
              DiT's 4x GELU MLP), class-conditional (1000 classes, ImageNet layout), for GPUs
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import ClassVar

from msdd.config.dicts import from_dict
from msdd.config.model import check
from msdd.config.presets import parse_override, set_path
from msdd.config.run import OptimConfig


@dataclass(frozen=True)
class GeneratorConfig:
    """The transformer (`msdd.generator.model.LatentDiT`). `patch_size` patchifies a grid latent (c, h, w)
    into (h/p)(w/p) tokens; token latents (L, C) are a sequence as they are. `num_classes` 0: unconditional;
    K > 0: class-conditional with a null class (index K) for classifier-free guidance."""

    section: ClassVar[str] = "generator"

    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 344  # SwiGLU hidden width
    patch_size: int = 2
    num_classes: int = 0
    time_scale: float = 1000.0  # the timestep embedding sees time_scale * t (DiT's convention)

    def __post_init__(self) -> None:
        prefix = self.section
        for name in ("width", "depth", "heads", "mlp_hidden", "patch_size"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.num_classes >= 0, f"{prefix}.num_classes",
              f"must be >= 0 (0: unconditional), got {self.num_classes}")
        check(self.width % self.heads == 0, f"{prefix}.heads",
              f"width {self.width} must be divisible by heads {self.heads}")
        check((self.width // self.heads) % 4 == 0, f"{prefix}.heads",
              f"head dim width/heads = {self.width // self.heads} must be a multiple of 4 for 2D RoPE")
        check(self.time_scale > 0, f"{prefix}.time_scale", f"must be > 0, got {self.time_scale}")


@dataclass(frozen=True)
class GenTrainConfig(OptimConfig):
    """Optimisation (AdamW, warm-up then cosine to min_lr_ratio; 1.0 keeps the lr constant, as DiT), EMA,
    cadence, and `label_dropout`: the share of class labels replaced by the null class (CFG)."""

    betas: tuple[float, float] = (0.9, 0.999)
    min_lr_ratio: float = 1.0
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.label_dropout < 1, f"{self.section}.label_dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class GenDataConfig:
    """What is encoded once before training: `source` "embedded" (random crops of the embedded photos),
    "embedded+FOLDER" or a folder of images (class-conditional: one subfolder per class, ImageNet layout);
    `images` crops (embedded) or files (a folder, a seeded random subset); `flip`: also encode every
    image mirrored. `num_workers`: DataLoader workers of the encoding pass."""

    section: ClassVar[str] = "data"

    source: str = "embedded"
    images: int = 2048
    flip: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        prefix = self.section
        check(self.images >= 1, f"{prefix}.images", f"must be >= 1, got {self.images}")
        check(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")


@dataclass(frozen=True)
class GenRunConfig:
    name: str = "custom"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: GenTrainConfig = field(default_factory=GenTrainConfig)
    data: GenDataConfig = field(default_factory=GenDataConfig)


PRESETS: dict[str, dict] = {
    "gen-tiny": {
        "generator": {"width": 128, "depth": 4, "heads": 4, "mlp_hidden": 344, "patch_size": 2},
        "train": {"lr": 1e-3, "batch_size": 64, "warmup_steps": 100, "max_steps": 3000, "min_lr_ratio": 0.1,
                  "ema_decay": 0.999, "log_every": 20, "ckpt_every": 500, "grid_every": 1000},
        "data": {"source": "embedded", "images": 8192, "flip": True},
    },
    "gen-xl": {
        "generator": {"width": 1152, "depth": 28, "heads": 16, "mlp_hidden": 3072, "patch_size": 2,
                      "num_classes": 1000},
        "train": {"lr": 1e-4, "batch_size": 256, "warmup_steps": 0, "max_steps": 400_000, "min_lr_ratio": 1.0,
                  "ema_decay": 0.9999, "bf16": True, "log_every": 100, "ckpt_every": 10_000, "grid_every": 10_000},
        "data": {"source": "/path/to/imagenet/train", "images": 1_281_167, "flip": True, "num_workers": 8},
    },
}


def load_gen_config(preset: str = "gen-tiny", overrides: list[str] | tuple[str, ...] = ()) -> GenRunConfig:
    """A validated `GenRunConfig` from a preset name and `KEY=VALUE` overrides."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: unknown generator preset; choose from {list(PRESETS)}")
    tree = {"name": preset, **copy.deepcopy(PRESETS[preset])}
    sections = {f.name for f in fields(GenRunConfig)}
    for text in overrides:  # a key outside the sections means `generator.KEY`
        set_path(tree, *parse_override(text, sections, "generator", "generator.depth=6"))
    return from_dict(GenRunConfig, tree)
