"""A decoder pass's MMDiT blocks in one call of msdd's CPU kernels (`cpu_kernels.blocks`).

Block by block, a paper-256 pass makes about 150 kernel calls from Python, each through a module's forward, the
optimised path's checks and the op dispatcher, a visible share of a student decode (benchmarks/README.md, "A decoder
pass's blocks in one call, and what a batch-1 pass pays"). `run_blocks`
makes one call where every block would run msdd's kernels anyway, with the same kernels in the same order (outputs
bit-identical; an MLP whose hidden size the kernel's panels do not fit runs on zero-padded copies of its weights,
`_mlp_panels`), msdd's int8 layers included, and runs the blocks one by one everywhere else: off the optimised CPU
path, torch.ao's int8 layers, a modulation vector per batch element, a module with hooks (so that hooks see their
calls).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from msdd.models import cpu_kernels
from msdd.models.layers import Linear, Stream, Tracked, _bf16_compute, _fast_cpu_inference
from msdd.models.precision import Int8Linear


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, ctx: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               block_mods: list[tuple], scope: dict | None = None) -> torch.Tensor:
    """The image tokens x (B, N, W) after the modulated blocks `blocks` (a decoder's), each with its streams'
    modulation vectors (image, context) from `block_mods`; ctx (B, L, W) the context tokens. On the optimised CPU
    path every block runs in one call of the kernels' `blocks` op: the same kernels in the same order as the blocks'
    forwards, without Python between them (benchmarks/README.md); elsewhere block by block. scope: a dict that lives
    for one decode (`Decoder.same_latents`: the weights and hooks do not change within it), where the first pass
    keeps what it checked of them."""
    if (out := _fused_blocks(blocks, x, ctx, rope, block_mods, scope)) is not None:
        return out
    for block, mods in zip(blocks, block_mods):
        x, ctx = block(x, ctx, None, rope, mods)
    return x


class _Plan(NamedTuple):
    """What `_fused_blocks` checked of the blocks once and reads on every pass, for the `structure` and x's `dtype` it
    was made for: each stream with its linear layers, the `cpu_kernels.blocks` flags and scalars (the norms' eps as
    they were then), and every module whose hooks the op would skip. Weights are checked on every pass (`_Weights`),
    modulation vectors read on every pass (`_fused_blocks`)."""

    structure: int
    dtype: torch.dtype
    int8: bool  # msdd's Int8Linear layers, else msdd's Linear layers
    streams: list[tuple[Stream, tuple]]  # (stream, its linear layers), two per block: image, context
    full: list[int]
    heads: int
    eps: float
    qk_eps: float
    modules: list[nn.Module]


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _fused_blocks(blocks: nn.ModuleList, x: torch.Tensor, ctx: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  block_mods: list[tuple], scope: dict | None) -> torch.Tensor | None:
    """`run_blocks` by `cpu_kernels.blocks`, or None where the blocks' forwards would not all run msdd's kernels
    (`_plan`; a modulation vector not (1, W) in bf16 or float32: one per batch element takes the per-call path's
    `gated_adaln`; with int8 layers, not in x's dtype: they take their input as adaLN gives it), or a module has hooks
    (the block-by-block path calls them). Checking the weights and hooks and gathering the op's arguments cost Python
    time at every pass of a student decode, with caches the blocks before it leave cold: the weights and hooks are
    checked once per `scope`, the arguments gathered once per set of modulation vectors (`_Weights` keeps them;
    benchmarks/README.md, "Less outside the blocks op, and the 32-px stage's two streams as pairs")."""
    dtype = x.dtype
    hooks = nn.modules.module
    if not (_fast_cpu_inference(x) and x.dim() == ctx.dim() == 3 and ctx.dtype == dtype
            and (_bf16_compute(x) if dtype == torch.bfloat16 else
                 dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))
            and len(block_mods) == len(blocks) and not hooks._global_forward_hooks
            and not hooks._global_forward_pre_hooks):
        return None
    weights = scope.get((blocks, dtype)) if scope is not None else None
    if weights is None or weights.plan.structure != Tracked.structure:
        weights = _WEIGHTS.get(blocks)
        if weights is None or weights.plan.structure != Tracked.structure or weights.plan.dtype != dtype:
            weights = _WEIGHTS[blocks] = _Weights.gather(_plan(blocks, dtype))
        elif not weights.current():
            weights = _WEIGHTS[blocks] = _Weights.gather(weights.plan)
        if not weights.plan.streams or weights.streams is None or _hooked(*weights.plan.modules):
            return None
        if scope is not None:
            scope[(blocks, dtype)] = weights
    plan = weights.plan
    if (kept := weights.calls.get(id(block_mods))) is not None and kept[0] is block_mods:
        params = kept[1]
    else:
        params = []
        for (stream, _), packed, mods in zip(plan.streams, weights.streams, (m for pair in block_mods for m in pair)):
            if mods is None or len(mods) != (2 if stream.pre_only else 6) or any(
                    v.dim() != 2 or v.shape[0] != 1 or v.dtype not in cpu_kernels.DTYPES
                    or plan.int8 and v.dtype != dtype for v in mods):
                return None
            params += mods
            params += packed
        if len(weights.calls) >= _CALLS:
            weights.calls.clear()
        weights.calls[id(block_mods)] = (block_mods, params)  # it holds the vectors: no other list can take their id
    return cpu_kernels.blocks(x, ctx, params, plan.full, plan.heads, plan.eps, plan.qk_eps, rope, plan.int8)


# the sets of modulation vectors whose op arguments a `_Weights` keeps (each entry holds its vectors: 0.2-0.4 MB at
# paper-256): a student's stages (the decoder's ModulationCache gives the same list for the same time, decode after
# decode); a many-step teacher's times cycle through more and gather them at every pass, as before
_CALLS = 8


class _Weights(NamedTuple):
    """Every stream's packed layers and q / k norm parameters as `_fused_blocks` passes them (None where a layer does
    not take msdd's kernel), gathered for `plan` through `Linear.panels` / `Int8Linear.panels` (the MLP's through
    `_mlp_panels`), with what they came from: each parameter and buffer of those modules (its module's dict, its name,
    the tensor or None) and the tensors' data addresses and in-place versions then. `current` checks those on every
    pass, a fraction of the Python of asking every layer (`panels`, the modules' attribute lookups;
    benchmarks/README.md, "The probe with msdd's own kernel, less Python per pass, the shipped models in the blocks op,
    where a batch-1 pass loses by op")."""

    plan: _Plan
    streams: list[list[torch.Tensor]] | None
    owners: list[tuple[dict, str, torch.Tensor | None]]
    tensors: list[torch.Tensor]
    addresses: list[int]
    versioned: list[torch.Tensor]  # the tensors with a version counter (not inference tensors)
    versions: list[int]
    calls: dict  # id of a set of modulation vectors (a list) -> (the list, the op's params with them)

    @classmethod
    def gather(cls, plan: _Plan) -> "_Weights":
        owners = [(d, name, t) for stream, layers in plan.streams for m in (*layers, stream.q_norm, stream.k_norm)
                  for d in (m._parameters, m._buffers) for name, t in d.items()]
        tensors = [t for _, _, t in owners if t is not None]
        streams = []
        for stream, layers in plan.streams:  # qkv[, the projection, the MLP's two layers]
            packed = [_panels(layer, plan) for layer in layers[:2]]
            packed += [_mlp_panels(*layers[2:], plan)] if layers[2:] else []
            if any(p is None for p in packed):
                streams = None
                break
            streams.append([t for p in packed for t in p] + stream.qk_norms())
        versioned = [t for t in tensors if not t.is_inference()]
        return cls(plan, streams, owners, tensors, [t.data_ptr() for t in tensors], versioned,
                   [t._version for t in versioned], {})

    def current(self) -> bool:
        """The modules hold the same tensors, at the same addresses and versions, as when gathered."""
        return (all(d.get(name) is t for d, name, t in self.owners)
                and [t.data_ptr() for t in self.tensors] == self.addresses
                and [t._version for t in self.versioned] == self.versions)


def _panels(layer: nn.Module, plan: _Plan, swiglu: bool = False) -> tuple | None:
    return layer.panels(swiglu) if plan.int8 else layer.panels(swiglu, dtype=plan.dtype)


def _mlp_panels(w12: nn.Module, w3: nn.Module, plan: _Plan) -> list[torch.Tensor] | None:
    """A SwiGLU MLP's two layers as their `panels` pack them, or, for msdd's `Linear` layers whose hidden size H is not
    a multiple of 64 (the first layer's panels hold 32 features of a and their 32 of b; the shipped tiny-64 models have
    344), packed with H padded with zeros to one: a padded feature's gate is silu(0) * 0 = 0 and its weights in the
    second layer are zeros, so the outputs are those of the unpadded layers (each sum gains exact zeros). None where
    neither applies."""
    if (first := _panels(w12, plan, swiglu=True)) is not None and (second := _panels(w3, plan)) is not None:
        return [*first, *second]
    h = w3.in_features
    if plan.int8 or h % 64 == 0 or w12.out_features != 2 * h or {w12.weight.dtype, w3.weight.dtype} != {plan.dtype}:
        return None
    pad = -h % 64
    a, b = w12.weight.detach().chunk(2)
    weight = torch.cat([F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, 0, 0, pad))])
    bias = None if w12.bias is None else torch.cat([F.pad(v, (0, pad)) for v in w12.bias.detach().chunk(2)])
    first = cpu_kernels.pack_linear(weight, bias, swiglu=True)
    second = cpu_kernels.pack_linear(F.pad(w3.weight.detach(), (0, pad)), None if w3.bias is None else w3.bias.detach())
    return None if first is None or second is None else [*first, *second]


def _plan(blocks: nn.ModuleList, dtype: torch.dtype) -> _Plan:
    """`_fused_blocks`'s checks of the structure: every block's streams modulated, with msdd's `Linear` layers or all
    of them msdd's `Int8Linear` (not torch.ao's), one head count, one adaLN eps, one q / k norm eps, pre_only only the
    last block's context stream; no streams where one fails."""
    plan = _Plan(Tracked.structure, dtype, False, [], [], 0, 0.0, 0.0, [])
    if not len(blocks):
        return plan
    first = blocks[0].img
    kind = type(first.qkv)
    if kind not in (Linear, Int8Linear):
        return plan
    heads, eps, qk_eps = first.heads, first.norm1.eps, first.q_norm.eps
    streams, full, modules = [], [], []
    for i, block in enumerate(blocks):
        modules.append(block)
        for stream, may_end in ((block.img, False), (block.ctx, i == len(blocks) - 1)):
            layers = (stream.qkv,) if stream.pre_only else (stream.qkv, stream.proj, stream.mlp.w12, stream.mlp.w3)
            norms = (stream.norm1,) if stream.pre_only else (stream.norm1, stream.norm2)
            if ((stream.pre_only and not may_end) or stream.heads != heads or not stream.modulated
                    or any(n.weight is not None or n.eps != eps for n in norms)
                    or stream.q_norm.eps != qk_eps or stream.k_norm.eps != qk_eps
                    or any(type(layer) is not kind for layer in layers)):
                return plan
            streams.append((stream, layers))
            full.append(0 if stream.pre_only else 1)
            modules += layers if stream.pre_only else (*layers, stream.mlp)
    return plan._replace(int8=kind is Int8Linear, streams=streams, full=full, heads=heads, eps=eps, qk_eps=qk_eps,
                         modules=modules)


# a decoder's blocks (nn.ModuleList) -> its `_Weights` (and with them its `_Plan`): beside the module, not in it, so
# that copies of a decoder (deepcopy, pickle) carry no packed weights, as `Linear`'s own copies do not
_WEIGHTS: "weakref.WeakKeyDictionary[nn.ModuleList, _Weights]" = weakref.WeakKeyDictionary()


def forget(blocks: nn.Module) -> None:
    """Drop the gathered weights of `blocks` (`msdd.models.caches.forget`)."""
    _WEIGHTS.pop(blocks, None)
