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
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Literal

import yaml

POS_SCHEMES = ("none", "1d", "cross")
FAMILIES = ("msdd", "ssdd", "plain")
SSDD_LATENT_FACTOR = 8  # the SSDD latent map (spatial latent, or the token latent mapped) is at 1/8 resolution


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid config value for `{name}`: {msg}")


def _check_choice(value: Any, name: str, choices: tuple) -> None:
    _check(value in choices, name, f"got {value!r}, expected one of {list(choices)}")


@dataclass(frozen=True)
class TransformerConfig:
    """An MMDiT stack. `mlp_hidden` is the SwiGLU hidden width."""

    depth: int = 4
    width: int = 128
    heads: int = 4
    mlp_hidden: int = 344
    patch_size: int = 4
    # Positions of the second (context / register) stream: none, 1d RoPE, or cross-RoPE (SPEC 4).
    context_pos: Literal["none", "1d", "cross"] = "cross"

    def validate(self, prefix: str) -> None:
        _check_choice(self.context_pos, f"{prefix}.context_pos", POS_SCHEMES)
        for name in ("depth", "width", "heads", "mlp_hidden", "patch_size"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.width % self.heads == 0, f"{prefix}.heads",
               f"width {self.width} must be divisible by heads {self.heads}")
        # 2D RoPE splits the head dim in two halves (rows, columns) of rotated pairs.
        _check((self.width // self.heads) % 4 == 0, f"{prefix}.heads",
               f"head dim width/heads = {self.width // self.heads} must be a multiple of 4 for 2D RoPE")


@dataclass(frozen=True)
class EncoderConfig(TransformerConfig):
    """Image patches + learnable register tokens; the registers become the latent."""


@dataclass(frozen=True)
class DecoderConfig(TransformerConfig):
    """Noisy image patches + context tokens from the latent, modulated by the model time."""


@dataclass(frozen=True)
class FlowConfig:
    """Multi-scale flow (SPEC 5). `num_stages` resolutions, each half the next."""

    num_stages: int = 4
    gamma: float = 1.0 / 3.0
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    # none | sigmoid (sigmoid(bias - logSNR(t))) | stage (1 / (1 - e_s)^2: the image content of every
    # stage's end weighs the same, instead of 1/16 for the first stage of four)
    loss_weighting: Literal["none", "sigmoid", "stage"] = "none"
    sigmoid_bias: float = 0.0
    lpips_weight: float = 0.0
    cfg_drop: float = 0.1
    # What the network predicts: "v" the velocity x_start_n - x_end_n (SPEC 5), or "x" the clean stage
    # end x_end, trained with MSE on x_end and turned into the velocity of the same path for sampling
    # (msdd.flow.path.velocity_from_end). "x" is a time weighting of the same flow objective.
    prediction: Literal["v", "x"] = "v"

    def validate(self, prefix: str) -> None:
        _check_choice(self.prediction, f"{prefix}.prediction", ("v", "x"))
        _check(self.num_stages >= 1, f"{prefix}.num_stages", f"must be >= 1, got {self.num_stages}")
        _check(0.0 < self.gamma < 1.0, f"{prefix}.gamma", f"must be in (0, 1), got {self.gamma}")
        _check_choice(self.t_sampling, f"{prefix}.t_sampling", ("logit_normal", "uniform"))
        _check_choice(self.loss_weighting, f"{prefix}.loss_weighting", ("none", "sigmoid", "stage"))
        _check(self.lpips_weight >= 0.0, f"{prefix}.lpips_weight", "must be >= 0")
        _check(0.0 <= self.cfg_drop < 1.0, f"{prefix}.cfg_drop", f"must be in [0, 1), got {self.cfg_drop}")


@dataclass(frozen=True)
class SamplingConfig:
    """Default decode schedule stored with a model: Euler steps per stage and guidance scale."""

    steps: tuple[int, ...] = (10, 10, 10, 10)
    cfg: float = 1.0

    def validate(self, prefix: str, num_stages: int) -> None:
        _check(len(self.steps) == num_stages, f"{prefix}.steps",
               f"needs one entry per stage ({num_stages}), got {list(self.steps)}")
        _check(all(s >= 1 for s in self.steps), f"{prefix}.steps", f"all must be >= 1, got {list(self.steps)}")
        _check(self.cfg >= 0.0, f"{prefix}.cfg", f"must be >= 0, got {self.cfg}")


@dataclass(frozen=True)
class SSDDConfig:
    """The SSDD family (SPEC 10): a pixel-space U-Net with a transformer at its bottleneck, one flow from
    noise (t = 1) to the image (t = 0), sampled with the schedule t_i = (1 - i/N)^shift, N = `steps`.

    The latent is either our 1-D token latent (`latent_kind: tokens`, the token encoder of the `encoder`
    section, (latent_tokens, latent_dim)) or a convolutional f8 spatial latent (`latent_kind: spatial`,
    (spatial_channels, R/8, R/8), encoded by a conv encoder with `encoder_channels`, one entry per level
    = 3 halvings). Either way the decoder sees a (spatial_channels, R/8, R/8) map of it.
    The U-Net width at level i is base_channels * channel_mults[i]; the transformer at the bottleneck
    has width base_channels * channel_mults[-1].
    """

    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4)
    blocks_per_level: int = 1
    mid_depth: int = 2
    mid_heads: int = 4
    mid_mlp_hidden: int = 172
    latent_kind: Literal["tokens", "spatial"] = "tokens"
    spatial_channels: int = 4
    encoder_channels: tuple[int, ...] = (32, 64, 128, 128)
    steps: int = 8
    shift: float = 2.0
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    # v: the network predicts the velocity n - x (SSDD); x: it predicts the image (plus x_lin with the
    # linear path), trained with MSE on it, and the sampler uses the velocity (x_t - x_hat) / t
    prediction: Literal["v", "x"] = "v"
    lpips_weight: float = 0.0
    repa_weight: float = 0.0

    def validate(self, prefix: str, image_size: int) -> None:
        _check_choice(self.latent_kind, f"{prefix}.latent_kind", ("tokens", "spatial"))
        _check_choice(self.t_sampling, f"{prefix}.t_sampling", ("logit_normal", "uniform"))
        _check_choice(self.prediction, f"{prefix}.prediction", ("v", "x"))
        for name in ("base_channels", "blocks_per_level", "mid_depth", "mid_heads", "mid_mlp_hidden",
                     "spatial_channels", "steps"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(len(self.channel_mults) >= 1 and all(m >= 1 for m in self.channel_mults), f"{prefix}.channel_mults",
               f"needs one or more multipliers >= 1, got {list(self.channel_mults)}")
        _check(len(self.encoder_channels) == 4 and all(c >= 1 for c in self.encoder_channels),
               f"{prefix}.encoder_channels",
               f"needs 4 channel counts >= 1 (one per level of the f8 encoder), got {list(self.encoder_channels)}")
        for name, chans in (("channel_mults", [self.base_channels * m for m in self.channel_mults]),
                            ("encoder_channels", list(self.encoder_channels))):
            _check(all(c % 4 == 0 for c in chans), f"{prefix}.{name}",
                   f"every level's channel count must be a multiple of 4 (GroupNorm groups), got {chans}")
        width = self.base_channels * self.channel_mults[-1]
        _check(width % self.mid_heads == 0, f"{prefix}.mid_heads",
               f"the bottleneck width base_channels * channel_mults[-1] = {width} must be divisible by mid_heads "
               f"{self.mid_heads}")
        _check((width // self.mid_heads) % 4 == 0, f"{prefix}.mid_heads",
               f"head dim {width // self.mid_heads} must be a multiple of 4 for 2D RoPE")
        _check(self.shift > 0, f"{prefix}.shift", f"must be > 0, got {self.shift}")
        _check(self.lpips_weight >= 0.0, f"{prefix}.lpips_weight", "must be >= 0")
        _check(self.repa_weight >= 0.0, f"{prefix}.repa_weight", "must be >= 0")
        down = 2 ** (len(self.channel_mults) - 1)
        _check(image_size % max(down, SSDD_LATENT_FACTOR) == 0, f"{prefix}.channel_mults",
               f"image_size {image_size} must be divisible by {SSDD_LATENT_FACTOR} (the latent map) and by "
               f"2^(levels - 1) = {down} (the U-Net bottleneck)")

    @property
    def width(self) -> int:
        """Width of the bottleneck transformer (and of the conditioning vector)."""
        return self.base_channels * self.channel_mults[-1]


@dataclass(frozen=True)
class ModelConfig:
    """`family` picks the decoder: "msdd" (the multi-scale flow, SPEC 4-6), "ssdd" (SPEC 10, section
    `ssdd`) or "plain" (a baseline: the msdd encoder and decoder network as a deterministic one-pass
    autoencoder, decoder(zeros, tau = 0, z), trained with MSE (+ LPIPS at flow.lpips_weight)).
    Sections a family does not use keep their defaults and are ignored."""

    family: Literal["msdd", "ssdd", "plain"] = "msdd"
    image_size: int = 64
    latent_tokens: int = 32
    latent_dim: int = 8
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ssdd: SSDDConfig = field(default_factory=SSDDConfig)
    # True for a distilled student: it decodes with one step (per stage) unless asked otherwise.
    one_step: bool = False
    # A linear path through the latent (msdd.models.linear), PCA-initialised at the start of training:
    # z = P x + z_net, and the decoder refines x_lin = D z (every family with the token latent; SSDD's
    # spatial latent has none and ignores it, like the other sections it does not use).
    linear_path: bool = False
    # A small residual conv net on the linear image (msdd.models.linear.Refiner): x_lin + f(x_lin) at
    # each stage's resolution, f starting at zero; the nonlinear decode of the linear code that the
    # transformer then adds to. 0 channels: none. Needs the linear path (msdd and plain families).
    refiner_width: int = 0
    refiner_blocks: int = 4

    def validate(self, prefix: str = "model") -> None:
        _check_choice(self.family, f"{prefix}.family", FAMILIES)
        _check(self.image_size >= 1, f"{prefix}.image_size", f"must be >= 1 (pixels), got {self.image_size}")
        _check(self.refiner_width >= 0, f"{prefix}.refiner_width", f"must be >= 0, got {self.refiner_width}")
        _check(self.refiner_blocks >= 0, f"{prefix}.refiner_blocks", f"must be >= 0, got {self.refiner_blocks}")
        _check(self.refiner_width == 0 or (self.uses_linear_path and self.family != "ssdd"),
               f"{prefix}.refiner_width",
               f"refines the linear image of the msdd and plain families: set {prefix}.linear_path=true "
               f"(family {self.family}) or {prefix}.refiner_width=0")
        self.encoder.validate(f"{prefix}.encoder")
        self.decoder.validate(f"{prefix}.decoder")
        self.flow.validate(f"{prefix}.flow")
        self.sampling.validate(f"{prefix}.sampling", self.flow.num_stages)
        _check(self.latent_tokens >= 1, f"{prefix}.latent_tokens", "must be >= 1")
        _check(self.latent_dim >= 1, f"{prefix}.latent_dim", "must be >= 1")
        _check(self.image_size % self.encoder.patch_size == 0, f"{prefix}.encoder.patch_size",
               f"image_size {self.image_size} must be divisible by the patch size {self.encoder.patch_size}")
        if self.family == "ssdd":
            self.ssdd.validate(f"{prefix}.ssdd", self.image_size)
            _check(self.sampling.cfg == 1.0, f"{prefix}.sampling.cfg",
                   f"SSDD decoders are trained without a null latent (no classifier-free guidance); must be 1, "
                   f"got {self.sampling.cfg}")
            return
        if self.family == "plain":
            _check(self.image_size % self.decoder.patch_size == 0, f"{prefix}.decoder.patch_size",
                   f"image_size {self.image_size} must be divisible by the patch size {self.decoder.patch_size}")
            return
        # The first stage works at image_size / 2^(S-1) and must still hold whole patches, and be even
        # so that x_start (one more halving) exists.
        first = self.stage_resolutions[0]
        _check(self.image_size % (2 ** self.flow.num_stages) == 0,
               f"{prefix}.flow.num_stages",
               f"image_size {self.image_size} must be divisible by 2^num_stages = {2 ** self.flow.num_stages}")
        _check(first % self.decoder.patch_size == 0 and first >= self.decoder.patch_size,
               f"{prefix}.decoder.patch_size",
               f"first-stage resolution {first} (image_size / 2^(S-1)) must be a multiple of the patch size "
               f"{self.decoder.patch_size}; use fewer stages or a smaller patch")

    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        s = self.flow.num_stages
        return tuple(self.image_size // 2 ** (s - 1 - i) for i in range(s))

    @property
    def uses_linear_path(self) -> bool:
        return self.linear_path and not self.spatial_latent

    @property
    def spatial_latent(self) -> bool:
        return self.family == "ssdd" and self.ssdd.latent_kind == "spatial"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one image's latent: (tokens, channels), or (channels, R/8, R/8) for a spatial latent."""
        if self.spatial_latent:
            side = self.image_size // SSDD_LATENT_FACTOR
            return (self.ssdd.spatial_channels, side, side)
        return (self.latent_tokens, self.latent_dim)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent (what latent_mean / latent_std are per)."""
        return self.latent_shape[0] if self.spatial_latent else self.latent_dim

    @property
    def compression(self) -> float:
        return self.image_size**2 * 3 / math.prod(self.latent_shape)


@dataclass(frozen=True)
class TrainConfig:
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

    def validate(self, prefix: str = "train") -> None:
        _check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
               f"needs two values in [0, 1), got {self.betas}")
        _check(self.max_steps >= 1, f"{prefix}.max_steps", "must be >= 1")
        _check(0 <= self.warmup_steps, f"{prefix}.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip > 0, f"{prefix}.grad_clip", "must be > 0")
        _check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", "must be in [0, 1)")
        for name in ("log_every", "ckpt_every", "grid_every", "keep_checkpoints", "pca_crops"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.seed >= 0, f"{prefix}.seed", f"must be >= 0, got {self.seed}")
        _check(self.linear_lr_scale >= 0, f"{prefix}.linear_lr_scale", "must be >= 0 (0 freezes the linear path)")


@dataclass(frozen=True)
class DistillConfig:
    """Stage 2 (SPEC 7). Defaults are the paper's best setting."""

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
    cfg: float = 1.0
    teacher_steps: int = 1
    discriminator: Literal["dino", "patch"] = "dino"
    perceptual: Literal["lpips", "none"] = "lpips"
    ema_decay: float = 0.999
    log_every: int = 10
    ckpt_every: int = 500
    grid_every: int = 500

    def validate(self, prefix: str = "distill") -> None:
        _check(self.lr > 0 and self.disc_lr > 0, f"{prefix}.lr", "learning rates must be > 0")
        _check(self.max_steps >= 1, f"{prefix}.max_steps", "must be >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        for name in ("lambda_rec", "lambda_perc", "lambda_adv", "lambda_pix", "cfg"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        _check(self.teacher_steps >= 1, f"{prefix}.teacher_steps", "must be >= 1")
        for name in ("log_every", "ckpt_every", "grid_every"):  # steps between logs / checkpoints / grids
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check_choice(self.discriminator, f"{prefix}.discriminator", ("dino", "patch"))
        _check_choice(self.perceptual, f"{prefix}.perceptual", ("lpips", "none"))


@dataclass(frozen=True)
class DataConfig:
    """`source`: "embedded" (photos inside scikit-image / scikit-learn), a folder of images, or
    WebDataset tar shards (a path or brace pattern ending in .tar, e.g. /data/train-{000000..000099}.tar)."""

    source: str = "embedded"
    eval_source: str = "embedded"
    num_workers: int = 0
    limit: int | None = None

    def validate(self, prefix: str = "data") -> None:
        _check(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        _check(self.limit is None or self.limit >= 1, f"{prefix}.limit", "must be >= 1 or null")


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        self.model.validate()
        self.train.validate()
        self.distill.validate()
        self.data.validate()

    def to_dict(self) -> dict:
        return to_dict(self)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Turn a YAML/JSON value into the declared field type, with errors naming the field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"invalid config value for `{name}`: expected a mapping, got {value!r}")
        return from_dict(tp, value, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"invalid config value for `{name}`: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0]
        return tuple(_coerce(elem, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"invalid config value for `{name}`: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"invalid config value for `{name}`: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"invalid config value for `{name}`: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"invalid config value for `{name}`: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where}; valid keys: {sorted(known)}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = from_dict(ModelConfig, data, "model")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# presets and overrides


def preset_names() -> list[str]:
    files = resources.files("msdd").joinpath("configs").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _preset_dict(name: str) -> dict:
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; available presets: {preset_names()}")
    text = resources.files("msdd").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"invalid override `{dotted}`: `{k}` is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"invalid override {text!r}: expected KEY=VALUE, e.g. model.decoder.depth=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"invalid override {text!r}: value is not valid YAML ({e})") from None
    if key.split(".")[0] not in {f.name for f in fields(Config)}:
        key = f"model.{key}"  # `decoder.depth=4` means `model.decoder.depth=4`
    return key, value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated `Config` from a preset name (or a YAML file path) and `KEY=VALUE` overrides."""
    if preset.endswith((".yaml", ".yml")):
        with open(preset) as f:
            tree = yaml.safe_load(f) or {}
    else:
        tree = _preset_dict(preset)
    if "base" in tree:  # presets may extend another preset
        tree = _merge(_preset_dict(tree.pop("base")), tree)
    tree.setdefault("name", preset)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return from_dict(Config, tree)


def config_from_json(text: str) -> Config:
    return from_dict(Config, json.loads(text))


def diff_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two configs differ (used to refuse mismatched resumes)."""
    da, db = to_dict(a), to_dict(b)
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{p}.{k}" if p else k)
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y)):
            out.append(f"{p}: {x!r} -> {y!r}")

    walk(da, db, prefix)
    return out
