"""The training sections of a `Config`: `train` (stage 1), `distill` (stage 2) and `data`, and `Config`
itself (the four sections with a name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from msdd.config.dicts import to_dict
from msdd.config.model import ModelConfig, check, check_choice


@dataclass(frozen=True)
class StepsConfig:
    """What both training stages have: optimiser steps, batch, EMA and how often to log, save and draw."""

    section: ClassVar[str] = ""

    lr: float = 1e-4
    batch_size: int = 32  # global: split over processes (torchrun) and grad_accum micro-batches
    grad_accum: int = 1
    warmup_steps: int = 100
    max_steps: int = 10_000
    ema_decay: float = 0.999
    ema_warmup: bool = True  # ramp the decay as min(decay, (1 + n) / (10 + n)); false: `ema_decay` from step 1
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 500  # ... between checkpoints
    grid_every: int = 500  # ... between preview grids

    def __post_init__(self) -> None:
        prefix = self.section
        check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "grid_every"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(0 <= self.warmup_steps, f"{prefix}.warmup_steps", "must be >= 0")
        check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", "must be in [0, 1)")


@dataclass(frozen=True)
class OptimConfig(StepsConfig):
    """A `train` section: AdamW betas and weight decay, the cosine schedule's floor, gradient clipping,
    bf16 autocast, the seed and how many checkpoints to keep (stage 1 and the latent generator)."""

    section: ClassVar[str] = "train"

    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        prefix = self.section
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
              f"needs two values in [0, 1), got {self.betas}")
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip > 0, f"{prefix}.grad_clip", "must be > 0")
        check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(0 <= self.seed < 2**63, f"{prefix}.seed", f"must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """Stage 1: the tokenizer trained from scratch (or from `init_from`)."""

    init_from: str = ""  # stage 1 only: start from a trained model (directory, bundled name or HF repo id)
    # model.linear_path: training crops the PCA that initialises it is fitted on, and the learning rate
    # of its two linear maps relative to `lr` (Adam moves every weight by about lr per step; PCA weights
    # are ~1/sqrt(pixels) in size, so they need a much smaller rate than the transformer)
    pca_crops: int = 10_000
    linear_lr_scale: float = 0.01
    # torch.compile the encoder's and decoder's transformer blocks for the training step (one by one; the first
    # steps compile them, then inductor's cache on disk serves later runs): benchmarks/README.md "Training step"
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        prefix = self.section
        check(self.pca_crops >= 1, f"{prefix}.pca_crops", f"must be >= 1, got {self.pca_crops}")
        check(self.linear_lr_scale >= 0, f"{prefix}.linear_lr_scale", "must be >= 0 (0 freezes the linear path)")


@dataclass(frozen=True)
class DistillConfig(StepsConfig):
    """Stage 2 (SPEC 7). Defaults are the paper's best setting."""

    section: ClassVar[str] = "distill"

    batch_size: int = 16  # global, as train.batch_size
    warmup_steps: int = 50
    max_steps: int = 2_000
    disc_lr: float = 5e-5
    lambda_rec: float = 2.5
    lambda_perc: float = 0.5
    lambda_adv: float = 1.0
    # MSE between the student's final image and the real image (inside the lambda_rec bracket, beside
    # LPIPS): ties the student to the real image when no VGG16 file is available for LPIPS.
    lambda_pix: float = 0.0
    adaptive_adv: bool = True
    # what the adaptive weight balances L_adv against: "total" (the whole non-adversarial term) or
    # "reference" (L_rec + lambda_perc L_perc, unweighted, as the reference code: issue 15 D6)
    adaptive_of: Literal["total", "reference"] = "total"
    adv_start_step: int = 0
    cfg: float = 1.0  # the teacher's guidance scale (`guidance` in the API); this name is stored in model files
    teacher_steps: int = 1
    discriminator: Literal["dino", "patch"] = "dino"
    perceptual: Literal["lpips", "none"] = "lpips"
    # the reference code's stage-2 optimiser (issue 15, D12): lr and disc_lr scaled by batch_size /
    # lr_reference_batch when > 0 (there: 256), and the discriminator's gradient norm clipped when > 0
    lr_reference_batch: int = 0
    disc_grad_clip: float = 0.0
    # the share of student passes decoded from the null context (the teacher's targets too), so that the
    # student keeps an unconditional mode for guidance (the reference code: 0.1, issue 15 D11)
    student_cfg_drop: float = 0.0
    # the DINO discriminator's heads: "small" (128 wide, GroupNorm: 0.99M) or "reference" (the reference
    # code's: 384 wide, BatchNorm, residual / sqrt(2), CLS token added, random crops: 7.38M; D7)
    disc_heads: Literal["small", "reference"] = "small"
    # torch.compile the student decoder's transformer blocks (as train.compile: one by one, the first steps compile
    # them); pays with adaptive_of=total's two whole backward passes, not with reference's three (CPU, tiny-64):
    # benchmarks/README.md "Stage 2"
    compile: bool = False

    @property
    def lr_batch_factor(self) -> float:
        """What `lr` and `disc_lr` are multiplied by: batch_size / lr_reference_batch, or 1."""
        return self.batch_size / self.lr_reference_batch if self.lr_reference_batch else 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        prefix = self.section
        check(self.disc_lr > 0, f"{prefix}.disc_lr", "must be > 0")
        for name in ("lambda_rec", "lambda_perc", "lambda_adv", "lambda_pix", "cfg"):
            check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        check(self.teacher_steps >= 1, f"{prefix}.teacher_steps", "must be >= 1")
        check_choice(self.discriminator, f"{prefix}.discriminator", ("dino", "patch"))
        check_choice(self.perceptual, f"{prefix}.perceptual", ("lpips", "none"))
        check_choice(self.adaptive_of, f"{prefix}.adaptive_of", ("total", "reference"))
        check(self.lr_reference_batch >= 0, f"{prefix}.lr_reference_batch", "must be >= 0 (0: no batch scaling)")
        check(self.disc_grad_clip >= 0, f"{prefix}.disc_grad_clip", "must be >= 0 (0: no clipping)")
        check(0 <= self.student_cfg_drop < 1, f"{prefix}.student_cfg_drop", "must be in [0, 1)")
        check_choice(self.disc_heads, f"{prefix}.disc_heads", ("small", "reference"))


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
