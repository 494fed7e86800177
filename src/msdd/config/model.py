"""The `model` section: what is saved with a tokenizer (family, image size, latent shape, encoder, decoder,
flow, sampling, and the `ssdd` section of the SSDD family). Checks that need two sections (steps per stage,
patch sizes against the image size) are `ModelConfig`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

POS_SCHEMES = ("none", "1d", "cross", "cross_both")
FAMILIES = ("msdd", "ssdd", "plain")
SSDD_LATENT_FACTOR = 8  # the SSDD latent map (spatial latent, or the token latent mapped) is at 1/8 resolution


def check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid config value for `{name}`: {msg}")


def check_choice(value: Any, name: str, choices: tuple) -> None:
    check(value in choices, name, f"got {value!r}, expected one of {list(choices)}")


@dataclass(frozen=True)
class TransformerConfig:
    """An MMDiT stack. `mlp_hidden` is the SwiGLU hidden width."""

    section: ClassVar[str]  # where it sits in a `Config`: set by the encoder and decoder subclasses

    depth: int = 4
    width: int = 128
    heads: int = 4
    mlp_hidden: int = 344
    patch_size: int = 4
    # Positions of the second (context / register) stream: none, 1d RoPE, or cross-RoPE (SPEC 4) with
    # the base scaled on the column axis ("cross") or on both axes ("cross_both", the reference code: D9).
    context_pos: Literal["none", "1d", "cross", "cross_both"] = "cross"
    # zero: adaLN-zero blocks, a zero final layer, encoder registers of std 0.02; reference: PyTorch's
    # default init and registers of std 1, as the paper's reference code (issue 15 D10)
    init: Literal["zero", "reference"] = "zero"

    def __post_init__(self) -> None:
        prefix = self.section
        check_choice(self.context_pos, f"{prefix}.context_pos", POS_SCHEMES)
        check_choice(self.init, f"{prefix}.init", ("zero", "reference"))
        for name in ("depth", "width", "heads", "mlp_hidden", "patch_size"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.width % self.heads == 0, f"{prefix}.heads",
               f"width {self.width} must be divisible by heads {self.heads}")
        # 2D RoPE splits the head dim in two halves (rows, columns) of rotated pairs.
        check((self.width // self.heads) % 4 == 0, f"{prefix}.heads",
               f"head dim width/heads = {self.width // self.heads} must be a multiple of 4 for 2D RoPE")


@dataclass(frozen=True)
class EncoderConfig(TransformerConfig):
    """Image patches + learnable register tokens; the registers become the latent."""

    section: ClassVar[str] = "model.encoder"


@dataclass(frozen=True)
class DecoderConfig(TransformerConfig):
    """Noisy image patches + context tokens from the latent, modulated by the model time."""

    section: ClassVar[str] = "model.decoder"

    # the sinusoidal time embedding sees time_scale * tau (tau in [0, 1]): 1000 spreads tau over its
    # frequencies (DiT's convention); the paper's reference code feeds tau itself (1.0, issue 15 D8)
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.time_scale > 0, f"{self.section}.time_scale", f"must be > 0, got {self.time_scale}")


@dataclass(frozen=True)
class FlowConfig:
    """Multi-scale flow (SPEC 5). `num_stages` resolutions, each half the next."""

    section: ClassVar[str] = "model.flow"

    num_stages: int = 4
    gamma: float = 1.0 / 3.0
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    # none | sigmoid (sigmoid(bias - logSNR(t)) on the global time t) | stage (1 / (1 - e_s)^2: the
    # image content of every stage's end weighs the same, instead of 1/16 for the first stage of four) |
    # sigmoid_local (the paper's reference code: -1/2 dlogSNR/dr exp(bias) sigmoid(logSNR(r) - bias) on
    # each stage's LOCAL time r, the same curve in every stage; bias -3 there: mean 0.22 under logit-normal r)
    loss_weighting: Literal["none", "sigmoid", "stage", "sigmoid_local"] = "none"
    sigmoid_bias: float = 0.0
    # stage_sum: the sum over stages of each stage's mean loss (about num_stages x a sample mean);
    # sample_mean: the mean over the batch's samples (the reference code's scale)
    loss_reduction: Literal["stage_sum", "sample_mean"] = "stage_sum"
    lpips_weight: float = 0.0
    cfg_drop: float = 0.1
    # What the network predicts: "v" the velocity x_start_n - x_end_n (SPEC 5), or "x" the clean stage
    # end x_end, trained with MSE on x_end and turned into the velocity of the same path for sampling
    # (msdd.flow.path.velocity_from_end). "x" is a time weighting of the same flow objective.
    prediction: Literal["v", "x"] = "v"

    def __post_init__(self) -> None:
        prefix = self.section
        check_choice(self.prediction, f"{prefix}.prediction", ("v", "x"))
        check(self.num_stages >= 1, f"{prefix}.num_stages", f"must be >= 1, got {self.num_stages}")
        check(0.0 < self.gamma <= 1.0 / 3.0 + 1e-9, f"{prefix}.gamma",  # SPEC 6: block noise's eigenvalue 1 - 3 gamma
              f"must be in (0, 1/3] (the block noise's covariance has the eigenvalue 1 - 3 gamma), got {self.gamma}")
        check_choice(self.t_sampling, f"{prefix}.t_sampling", ("logit_normal", "uniform"))
        check_choice(self.loss_weighting, f"{prefix}.loss_weighting", ("none", "sigmoid", "stage", "sigmoid_local"))
        check_choice(self.loss_reduction, f"{prefix}.loss_reduction", ("stage_sum", "sample_mean"))
        check(self.lpips_weight >= 0.0, f"{prefix}.lpips_weight", "must be >= 0")
        check(0.0 <= self.cfg_drop < 1.0, f"{prefix}.cfg_drop", f"must be in [0, 1), got {self.cfg_drop}")


MAX_STEPS = 10_000  # Euler steps per stage of one decode (or of a generator's sampling)


@dataclass(frozen=True)
class SamplingConfig:
    """Default decode schedule stored with a model: Euler steps per stage and guidance scale (one entry
    per stage: checked by `ModelConfig`, which knows the number of stages)."""

    section: ClassVar[str] = "model.sampling"

    steps: tuple[int, ...] = (10, 10, 10, 10)
    cfg: float = 1.0  # the guidance scale (`guidance` in the API); this name is stored in shipped model files

    def __post_init__(self) -> None:
        prefix = self.section
        check(all(1 <= n <= MAX_STEPS for n in self.steps), f"{prefix}.steps",
              f"all must be in [1, {MAX_STEPS:,}], got {list(self.steps)}")
        check(self.cfg >= 0.0, f"{prefix}.cfg", f"must be >= 0, got {self.cfg}")


@dataclass(frozen=True)
class SSDDConfig:
    """The SSDD family (SPEC 10): a pixel-space U-Net with a transformer at its bottleneck, one flow from
    noise (t = 1) to the image (t = 0), sampled with the schedule t_i = (1 - i/N)^shift, N = `steps`.

    The latent is either our 1-D token latent (`latent_kind: tokens`, the token encoder of the `encoder`
    section, (latent_tokens, latent_dim)) or a convolutional f8 spatial latent (`latent_kind: spatial`,
    (spatial_channels, R/8, R/8), encoded by a conv encoder with `encoder_channels`, one entry per level
    = 3 halvings). Either way the decoder sees a (spatial_channels, R/8, R/8) map of it.
    The U-Net width at level i is base_channels * channel_mults[i]; the transformer at the bottleneck
    has width base_channels * channel_mults[-1]. Its fit to the image size is checked by `ModelConfig`.
    """

    section: ClassVar[str] = "model.ssdd"

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

    def __post_init__(self) -> None:
        prefix = self.section
        check_choice(self.latent_kind, f"{prefix}.latent_kind", ("tokens", "spatial"))
        check_choice(self.t_sampling, f"{prefix}.t_sampling", ("logit_normal", "uniform"))
        check_choice(self.prediction, f"{prefix}.prediction", ("v", "x"))
        for name in ("base_channels", "blocks_per_level", "mid_depth", "mid_heads", "mid_mlp_hidden",
                     "spatial_channels", "steps"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(len(self.channel_mults) >= 1 and all(m >= 1 for m in self.channel_mults), f"{prefix}.channel_mults",
               f"needs one or more multipliers >= 1, got {list(self.channel_mults)}")
        check(len(self.encoder_channels) == 4 and all(c >= 1 for c in self.encoder_channels),
               f"{prefix}.encoder_channels",
               f"needs 4 channel counts >= 1 (one per level of the f8 encoder), got {list(self.encoder_channels)}")
        for name, chans in (("channel_mults", [self.base_channels * m for m in self.channel_mults]),
                            ("encoder_channels", list(self.encoder_channels))):
            check(all(c % 4 == 0 for c in chans), f"{prefix}.{name}",
                   f"every level's channel count must be a multiple of 4 (GroupNorm groups), got {chans}")
        width = self.base_channels * self.channel_mults[-1]
        check(width % self.mid_heads == 0, f"{prefix}.mid_heads",
               f"the bottleneck width base_channels * channel_mults[-1] = {width} must be divisible by mid_heads "
               f"{self.mid_heads}")
        check((width // self.mid_heads) % 4 == 0, f"{prefix}.mid_heads",
               f"head dim {width // self.mid_heads} must be a multiple of 4 for 2D RoPE")
        check(self.shift > 0, f"{prefix}.shift", f"must be > 0, got {self.shift}")
        check(self.lpips_weight >= 0.0, f"{prefix}.lpips_weight", "must be >= 0")
        check(self.repa_weight >= 0.0, f"{prefix}.repa_weight", "must be >= 0")

    @property
    def width(self) -> int:
        """Width of the bottleneck transformer (and of the conditioning vector)."""
        return self.base_channels * self.channel_mults[-1]


@dataclass(frozen=True)
class ModelConfig:
    """`family` picks the decoder: "msdd" (the multi-scale flow, SPEC 4-6), "ssdd" (SPEC 10, section
    `ssdd`) or "plain" (a baseline: the msdd encoder and decoder network as a deterministic one-pass
    autoencoder, decoder(zeros, tau = 0, z), trained with MSE (+ LPIPS at flow.lpips_weight)).
    Sections a family does not use are checked like the others and otherwise ignored."""

    section: ClassVar[str] = "model"

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

    def __post_init__(self) -> None:
        """This section's own fields and how its sections fit together (each section checked its own
        fields when it was built)."""
        prefix = self.section
        check_choice(self.family, f"{prefix}.family", FAMILIES)
        check(self.image_size >= 1, f"{prefix}.image_size", f"must be >= 1 (pixels), got {self.image_size}")
        check(self.refiner_width >= 0, f"{prefix}.refiner_width", f"must be >= 0, got {self.refiner_width}")
        check(self.refiner_blocks >= 0, f"{prefix}.refiner_blocks", f"must be >= 0, got {self.refiner_blocks}")
        check(self.refiner_width == 0 or (self.uses_linear_path and self.family != "ssdd"),
               f"{prefix}.refiner_width",
               f"refines the linear image of the msdd and plain families: set {prefix}.linear_path=true "
               f"(family {self.family}) or {prefix}.refiner_width=0")
        check(len(self.sampling.steps) == self.flow.num_stages, f"{prefix}.sampling.steps",
               f"needs one entry per stage ({self.flow.num_stages}), got {list(self.sampling.steps)}")
        check(self.latent_tokens >= 1, f"{prefix}.latent_tokens", "must be >= 1")
        check(self.latent_dim >= 1, f"{prefix}.latent_dim", "must be >= 1")
        check(self.image_size % self.encoder.patch_size == 0, f"{prefix}.encoder.patch_size",
               f"image_size {self.image_size} must be divisible by the patch size {self.encoder.patch_size}")
        if self.family == "ssdd":
            down = 2 ** (len(self.ssdd.channel_mults) - 1)
            check(self.image_size % max(down, SSDD_LATENT_FACTOR) == 0, f"{prefix}.ssdd.channel_mults",
                   f"image_size {self.image_size} must be divisible by {SSDD_LATENT_FACTOR} (the latent map) and "
                   f"by 2^(levels - 1) = {down} (the U-Net bottleneck)")
            check(self.sampling.cfg == 1.0, f"{prefix}.sampling.cfg",
                   f"SSDD decoders are trained without a null latent (no classifier-free guidance); must be 1, "
                   f"got {self.sampling.cfg}")
            return
        if self.family == "plain":
            check(self.image_size % self.decoder.patch_size == 0, f"{prefix}.decoder.patch_size",
                   f"image_size {self.image_size} must be divisible by the patch size {self.decoder.patch_size}")
            return
        # The first stage works at image_size / 2^(S-1) and must still hold whole patches, and be even
        # so that x_start (one more halving) exists.
        first = self.stage_resolutions[0]
        check(self.image_size % (2 ** self.flow.num_stages) == 0,
               f"{prefix}.flow.num_stages",
               f"image_size {self.image_size} must be divisible by 2^num_stages = {2 ** self.flow.num_stages}")
        check(first % self.decoder.patch_size == 0 and first >= self.decoder.patch_size,
               f"{prefix}.decoder.patch_size",
               f"first-stage resolution {first} (image_size / 2^(S-1)) must be a multiple of the patch size "
               f"{self.decoder.patch_size}; use fewer stages or a smaller patch")

    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        num_stages = self.flow.num_stages
        return tuple(self.image_size // 2 ** (num_stages - 1 - i) for i in range(num_stages))

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
