"""The training sections of a `Config`: `train` (stage 1), `distill` (stage 2) and `data`, and `Config`
itself (the four sections with a name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from msdd.config.dicts import to_dict
from msdd.config.model import ModelConfig, check, check_choice


@dataclass(frozen=True)
class TrainConfig:
    section: ClassVar[str] = "train"

    batch_size: int = 32  # global: split over processes (torchrun) and grad_accum micro-batches
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_steps: int = 10_000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    grid_every: int = 500
    init_from: str = ""  # stage 1 only: start from a trained model (directory, bundled name or HF repo id)
    # model.linear_path: training crops the PCA that initialises it is fitted on, and the learning rate
    # of its two linear maps relative to `lr` (Adam moves every weight by about lr per step; PCA weights
    # are ~1/sqrt(pixels) in size, so they need a much smaller rate than the transformer)
    pca_crops: int = 10_000
    linear_lr_scale: float = 0.01

    def __post_init__(self) -> None:
        prefix = self.section
        check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
               f"needs two values in [0, 1), got {self.betas}")
        check(self.max_steps >= 1, f"{prefix}.max_steps", "must be >= 1")
        check(0 <= self.warmup_steps, f"{prefix}.warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip > 0, f"{prefix}.grad_clip", "must be > 0")
        check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", "must be in [0, 1)")
        for name in ("log_every", "ckpt_every", "grid_every", "keep_checkpoints", "pca_crops"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.seed >= 0, f"{prefix}.seed", f"must be >= 0, got {self.seed}")
        check(self.linear_lr_scale >= 0, f"{prefix}.linear_lr_scale", "must be >= 0 (0 freezes the linear path)")


@dataclass(frozen=True)
class DistillConfig:
    """Stage 2 (SPEC 7). Defaults are the paper's best setting."""

    section: ClassVar[str] = "distill"

    lr: float = 1e-4
    disc_lr: float = 5e-5
    max_steps: int = 2_000
    warmup_steps: int = 50
    batch_size: int = 16  # global, as train.batch_size
    grad_accum: int = 1
    lambda_rec: float = 2.5
    lambda_perc: float = 0.5
    lambda_adv: float = 1.0
    # MSE between the student's final image and the real image (inside the lambda_rec bracket, beside
    # LPIPS): ties the student to the real image when no VGG16 file is available for LPIPS.
    lambda_pix: float = 0.0
    adaptive_adv: bool = True
    adv_start_step: int = 0
    cfg: float = 1.0  # the teacher's guidance scale (`guidance` in the API); this name is stored in model files
    teacher_steps: int = 1
    discriminator: Literal["dino", "patch"] = "dino"
    perceptual: Literal["lpips", "none"] = "lpips"
    ema_decay: float = 0.999
    log_every: int = 10
    ckpt_every: int = 500
    grid_every: int = 500

    def __post_init__(self) -> None:
        prefix = self.section
        check(self.lr > 0 and self.disc_lr > 0, f"{prefix}.lr", "learning rates must be > 0")
        check(self.max_steps >= 1, f"{prefix}.max_steps", "must be >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        for name in ("lambda_rec", "lambda_perc", "lambda_adv", "lambda_pix", "cfg"):
            check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        check(self.teacher_steps >= 1, f"{prefix}.teacher_steps", "must be >= 1")
        for name in ("log_every", "ckpt_every", "grid_every"):  # steps between logs / checkpoints / grids
            check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check_choice(self.discriminator, f"{prefix}.discriminator", ("dino", "patch"))
        check_choice(self.perceptual, f"{prefix}.perceptual", ("lpips", "none"))


@dataclass(frozen=True)
class DataConfig:
    """`source`: "embedded" (photos inside scikit-image / scikit-learn), a folder of images, or
    WebDataset tar shards (a path or brace pattern ending in .tar, e.g. /data/train-{000000..000099}.tar)."""

    section: ClassVar[str] = "data"

    source: str = "embedded"
    eval_source: str = "embedded"
    num_workers: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        prefix = self.section
        check(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        check(self.limit is None or self.limit >= 1, f"{prefix}.limit", "must be >= 1 or null")


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return to_dict(self)
