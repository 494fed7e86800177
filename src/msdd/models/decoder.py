"""Decoder (SPEC 4): an MMDiT velocity network shared by all stages of the multi-scale flow.

Inputs: the noisy image at the current stage x (B, 3, H_s, W_s), the model time tau (B,) and the
latent context z (B, L, C). The image is patchified into (H_s/p)^2 tokens, z is mapped to L context
tokens; both streams are modulated by the embedding of tau only. Output: the velocity (B, 3, H_s, W_s).
One set of weights serves every stage: only the number of image tokens changes.

The learnable null context (1, L, C) replaces z for classifier-free guidance.

Options (model config): `linear_path` maps z linearly to an image x_lin = from_linear(z) (PCA-initialised,
msdd.models.linear), whose average-pooled copy at the stage resolution is a second input of every
patch; prediction "x" makes the network output the clean stage end, x_end = x_lin + output (output
starts at zero, so a fresh decoder reproduces x_lin), turned into the path's velocity for the sampler.
`refiner` (model.refiner_width / refiner_blocks) passes the pooled x_lin through a small residual conv
net (msdd.models.linear.Refiner, starting as the identity) before either use: a nonlinear decode of the
linear code, at the stage's resolution (once per decode and stage inside `Decoder.same_latents`, which the
family's sampler opens).

Modulation depends on tau only, and a sampler's call gives the whole batch one tau (the one-step student
sees one per stage): `ModulationCache` keeps the adaLN vectors of every block per tau, so a decode skips
its 2 x depth + 1 matrix-vector products of adaLN weights (a third of the parameters) after the first.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msdd.config import DecoderConfig
from msdd.flow.path import velocity_from_end
from msdd.flow.schedule import StageWindow
from msdd.models.fused_blocks import run_blocks
from msdd.models.layers import JointBlock, Linear, adaln, optimised
from msdd.models.rope import RopeCache
from msdd.models.linear import Refiner, fp32_region
from msdd.models.timestep import TimestepEmbedder


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaln = Linear(width, 2 * width)
        self.linear = Linear(width, out_dim)
        for layer in (self.adaln, self.linear):  # zero output at init: the first prediction is v = 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adaln(F.silu(c)).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mods: tuple | None = None) -> torch.Tensor:
        shift, scale = mods or self.modulation(c)
        return self.linear(adaln(self.norm, x, shift, scale))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H / p) (W / p), p p C): "b c (h p) (w q) -> b (h w) (p q c)", channels last first: faster
    than the one copy that gathers every element across the channels (benchmarks/README.md, "Less outside the blocks
    op, and the 32-px stage's two streams as pairs")."""
    b, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).contiguous()
    return x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)


class ModulationCache:
    """The decoder's modulation vectors per model time, for batches that share one time.

    Used only where reading tau's value is free and nothing needs gradients: CPU tensors, outside
    autograd and tracing, on the optimised path (msdd.models.layers.unoptimised). On a GPU the adaLN
    products take microseconds, and reading tau would synchronise the device. An entry is keyed by the
    time, the autocast dtype and the storage and version counter of every weight it depends on, so an
    optimiser or EMA step, `load_state_dict` or `.to()` never returns stale vectors; the decoder also
    clears the cache on `load_state_dict` and `.to()`.
    """

    max_entries = 1024  # a 4-stage teacher at 30 steps per stage uses 120

    def __init__(self) -> None:
        self.entries: dict[tuple, object] = {}

    def key(self, tau: torch.Tensor, params: Callable[[], list[nn.Parameter]],
            scope: dict | None = None) -> tuple | None:
        """The cache key of times tau (B,), or None when the vectors must be computed. params: the weights the
        vectors depend on; scope: a dict that lives for one decode (`Decoder.same_latents`: the weights do not
        change within it), which keeps the weights' part of the key after its first call (54 weights of a
        paper-256 decoder, costly to read at every pass with caches the blocks before it leave cold)."""
        if (not optimised() or tau.device.type != "cpu" or torch.is_grad_enabled() or torch.jit.is_tracing()
                or torch.compiler.is_compiling()):
            return None
        weights = scope.get(self) if scope is not None else None
        if weights is None:
            weights = params()
            weights = () if any(p.is_inference() for p in weights) else tuple(
                (p.data_ptr(), p._version) for p in weights)
            if scope is not None:
                scope[self] = weights
        if not weights:  # inference tensors: no version counter to tell a change
            return None
        times = tau.tolist()
        if any(t != times[0] for t in times):
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return times[0], dtype, weights

    def get(self, key: tuple | None, compute):
        if key is None:
            return compute()
        if key not in self.entries:
            if len(self.entries) >= self.max_entries or next(iter(self.entries), key)[2] != key[2]:
                self.entries.clear()  # all entries are of one set of weights: others (before a step) are dead
            self.entries[key] = compute()
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()


def _clear_modulation_cache(decoder: "Decoder", _incompatible_keys) -> None:
    decoder.mod_cache.clear()


# The decodes each thread is in: {id(decoder): (linear memo, pass memo)} (`Decoder.same_latents`). A context
# variable, not an attribute of the shared module: two threads decoding with one model each keep their own, and
# none is left behind when they finish in another order than they started.
_SCOPES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("msdd_decode_scopes", default=None)


class Decoder(nn.Module):

    def __init__(self, cfg: DecoderConfig, image_size: int, latent_tokens: int, latent_dim: int,
                 linear_path: bool = False, prediction: str = "v",
                 windows: tuple[StageWindow, ...] = (), refiner: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        if prediction == "x" and not windows:
            raise ValueError("x-prediction needs the stage windows to turn its estimate into a velocity")
        self.prediction = prediction
        self.windows = {win.resolution: win for win in windows}
        w, p = cfg.width, cfg.patch_size
        self.from_linear = nn.Linear(latent_tokens * latent_dim, 3 * image_size * image_size) if linear_path else None
        if linear_path:  # set by init_linear_path
            nn.init.zeros_(self.from_linear.weight)
            nn.init.zeros_(self.from_linear.bias)
        self.refiner = Refiner(*refiner) if linear_path and refiner[0] > 0 else None
        self.patch_embed = Linear((6 if linear_path else 3) * p * p, w)
        self.context_embed = Linear(latent_dim, w)
        self.t_embed = TimestepEmbedder(w, time_scale=cfg.time_scale)
        self.null_context = nn.Parameter(torch.randn(1, latent_tokens, latent_dim))
        self.blocks = nn.ModuleList(
            JointBlock(w, cfg.heads, cfg.mlp_hidden, modulated=True, ctx_pre_only=(i == cfg.depth - 1))
            for i in range(cfg.depth)
        )
        self.final = FinalLayer(w, 3 * p * p)
        self.rope = RopeCache(image_size // p, latent_tokens, w // cfg.heads, cfg.context_pos)
        self.mod_cache = ModulationCache()
        self.register_load_state_dict_post_hook(_clear_modulation_cache)
        if cfg.init == "reference":  # PyTorch's default init, not adaLN-zero and a zero final layer (D10)
            for name, m in self.named_modules():
                if name.endswith("adaln") or name == "final.linear":
                    m.reset_parameters()

    def linear_image(self, z: torch.Tensor, resolution: int) -> torch.Tensor:
        """x_lin = from_linear(z) (B, 3, R, R), average-pooled to `resolution`, then refined there by the
        refiner when there is one; fp32 (the refiner's residual runs under the caller's autocast). Inside
        `same_latents`, on the optimised path, computed once per latent tensor and resolution."""
        memo = self._scope()[0]
        if memo is None or not optimised() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._linear_image(z, resolution, {})
        if memo[0] is not z:  # the memo holds z: no other tensor can take its identity while it is there
            memo[:] = [z, {}]
        images = memo[1]
        if resolution not in images:
            images[resolution] = self._linear_image(z, resolution, images)
        return images[resolution]

    def _from_linear(self, flat: torch.Tensor) -> torch.Tensor:
        """from_linear on (B, K) latents. In inference row by row: BLAS sums a batch of rows in another order than
        one row (tiny-64: 1.2e-6 apart, enough to move a pixel of a generated sample by one level), and a sample must
        not depend on its batch (`msdd.seeding`); batched under autograd, tracing and compilation."""
        if (flat.shape[0] == 1 or torch.is_grad_enabled() or torch.jit.is_tracing()
                or torch.compiler.is_compiling()):
            return self.from_linear(flat)
        return torch.cat([self.from_linear(row) for row in flat.split(1)])

    def _linear_image(self, z: torch.Tensor, resolution: int, images: dict) -> torch.Tensor:
        with fp32_region(z.device):
            if 0 not in images:  # key 0: from_linear's full-resolution image
                images[0] = self._from_linear(z.float().flatten(1)).view(-1, 3, self.image_size, self.image_size)
            factor = self.image_size // resolution
            x_lin = F.avg_pool2d(images[0], factor) if factor > 1 else images[0]
        return self.refiner(x_lin) if self.refiner is not None else x_lin

    @contextlib.contextmanager
    def same_latents(self):
        """Within (a decode: every pass sees the same latents and weights), `linear_image` keeps its images for the
        latest latent tensor instead of mapping z through from_linear (3 x R x R outputs, a large weight read from
        memory) at every pass, a visible share of a small model's decode at batch 1 (benchmarks/README.md, "Gated
        residuals in the linear epilogue, and the batch-1 student against the batch-2 teacher"); and the passes check
        the weights (`ModulationCache.key`, `run_blocks`) at the first pass only."""
        token = _SCOPES.set({**(_SCOPES.get() or {}), id(self): ([None, {}], {})})
        try:
            yield
        finally:
            _SCOPES.reset(token)

    def _scope(self) -> tuple[list | None, dict | None]:
        """(linear memo: [latents, {resolution: linear image}], pass memo: what a pass checked of the weights, for
        the next passes) of the decode this thread is in with this decoder, or (None, None) outside one and under
        compilation (whose graphs use neither)."""
        if torch.compiler.is_compiling():
            return None, None
        return (_SCOPES.get() or {}).get(id(self), (None, None))

    def forward(self, x: torch.Tensor, tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity for noisy images x (B, 3, H, W) at model time tau (B,) given latents z (B, L, C)."""
        if self.prediction == "v":
            return self.network(x, tau, z)
        win = self.windows[int(x.shape[-1])]  # int: a constant when traced (ONNX export)
        r = (tau.float() - win.tau_end) / (win.tau_start - win.tau_end)
        return velocity_from_end(x.float(), self.end_estimate(x, tau, z).float(), win, r)

    def end_estimate(self, x: torch.Tensor, tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x-prediction: the clean image at the end of the stage of x (x_lin + network output)."""
        if self.from_linear is None:
            return self.network(x, tau, z)
        x_lin = self.linear_image(z, int(x.shape[-1]))
        return self.network(x, tau, z, x_lin).float() + x_lin

    def network(self, x: torch.Tensor, tau: torch.Tensor, z: torch.Tensor,
                x_lin: torch.Tensor | None = None) -> torch.Tensor:
        """The MMDiT itself: (B, 3, H, W) noisy image [+ x_lin at that resolution, computed here unless
        given], tau, z -> (B, 3, H, W)."""
        p = self.cfg.patch_size
        grid = int(x.shape[-1]) // p
        if self.from_linear is not None:
            x_lin = self.linear_image(z, int(x.shape[-1])) if x_lin is None else x_lin
            x = torch.cat([x, x_lin.to(x.dtype)], dim=1)
        h = self.patch_embed(patchify(x, p))  # (B, grid^2, W)
        ctx = self.context_embed(z.to(h.dtype))  # (B, L, W)
        block_mods, final_mods = self.modulations(tau)
        rope = self.rope(grid, x.device)
        h = run_blocks(self.blocks, h, ctx, rope, block_mods, self._scope()[1])
        out = self.final(h, None, final_mods)  # (B, grid^2, p*p*3)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=p, q=p)

    def modulations(self, tau: torch.Tensor) -> tuple[list[tuple], tuple]:
        """Every block's (image, context) modulation vectors and the final layer's (shift, scale) at times
        tau (B,): each (B, W), or (1, W) from the cache when the batch shares one time."""
        key = self.mod_cache.key(tau, self.modulation_params, self._scope()[1])

        def compute():
            c = self.t_embed(tau if key is None else tau[:1])  # (B, W) or (1, W)
            return [(b.img.modulation(c), b.ctx.modulation(c)) for b in self.blocks], self.final.modulation(c)

        return self.mod_cache.get(key, compute)

    def modulation_params(self) -> list[nn.Parameter]:
        """What the modulation vectors depend on: the time embedding's parameters and every adaLN layer's (read
        from the modules on every call, so a replaced layer or parameter is seen; much faster than filtering
        `named_parameters()` on every pass)."""
        layers = [stream.adaln for block in self.blocks for stream in (block.img, block.ctx)] + [self.final.adaln]
        return [*self.t_embed.parameters(), *(p for layer in layers for p in (layer.weight, layer.bias))]

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) start with an empty cache (Linear's drop their packing)
        return {**super().__getstate__(), "mod_cache": ModulationCache()}

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), .cuda(): the cached vectors are stale
        self.mod_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def null_like(self, z: torch.Tensor) -> torch.Tensor:
        return self.null_context.expand(z.shape[0], -1, -1).to(z.dtype)
