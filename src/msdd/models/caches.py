"""The fast inference path's caches, and the check of the weights' values that `Tokenizer` runs before each call.

Between calls the fast path keeps work derived from the weights: packed copies in `Linear` (msdd's kernel panels,
oneDNN's layout), the fused blocks' gathered weights (`fused_blocks._WEIGHTS`), a decoder's modulation vectors
(`ModulationCache`) and a Tokenizer's bf16 / int8 copies (`precision.WeightCopies`). Each is keyed by its tensors'
addresses and version counters, which an optimiser step, `load_state_dict`, `.to()` or an in-place edit under
`torch.no_grad()` change. Two kinds of edits change the values and neither: a write through `p.data` (an alias with a
version counter of its own: `p.data.copy_(w)`, an EMA's `p.data.mul_(d)`) and an in-place write to an inference tensor
(weights loaded under `torch.inference_mode()` have no version counter). `ValuesCheck` sees those by the values
themselves: it keeps a sample of every weight (16 evenly spaced values of each parameter and buffer, a small share of a
call; benchmarks/README.md, "The optimised decode against the reference path") and, when any sampled value has changed
since the previous call, `forget` drops every cache of the module. An edit that leaves all the sampled values as they
were (a few elements of a weight) is not seen: call `Tokenizer.forget_caches()` after one.
"""

from __future__ import annotations

import torch
from torch import nn

SAMPLES = 16  # values per tensor


def forget(module: nn.Module) -> None:
    """Drop what the fast path keeps for the weights of `module` and its submodules (recomputed at the next call)."""
    from msdd.models import fused_blocks
    from msdd.models.layers import Linear

    for m in module.modules():
        if isinstance(m, Linear):
            m._packed = m._panels = None
        if hasattr(m, "mod_cache"):
            m.mod_cache.clear()
        fused_blocks.forget(m)


class _Sample:
    """SAMPLES evenly spaced values of every parameter and buffer of a module: views of them kept from one call to the
    next (re-slicing every tensor at each call was a visible share of a small model's decode), the values copied."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.children = [(m._modules, name, child) for m in module.modules() for name, child in m._modules.items()]
        self.owners = [(d, name, t) for m in module.modules() for d in (m._parameters, m._buffers)
                       for name, t in d.items() if t is not None and t.numel()]
        self.addresses = [t.data_ptr() for _, _, t in self.owners]
        self.views = [t.detach().reshape(-1)[:: max(1, t.numel() // SAMPLES)][:SAMPLES] for _, _, t in self.owners]
        self.values = self.read()

    def read(self) -> torch.Tensor | None:
        return torch.cat(self.views) if self.views else None  # one dtype: cat promotes int8 / bf16 to float32

    def same_tensors(self, module: nn.Module) -> bool:
        """`module` holds the modules and tensors sampled, the tensors at their addresses (none replaced)."""
        return (module is self.module and all(d.get(name) is m for d, name, m in self.children)
                and all(d.get(name) is t for d, name, t in self.owners)
                and [t.data_ptr() for _, _, t in self.owners] == self.addresses)


class ValuesCheck:
    """The sampled values of each module checked (by identity), as of its previous `changed` call."""

    def __init__(self) -> None:
        self.samples: dict[int, _Sample] = {}

    def changed(self, module: nn.Module) -> bool:
        """Whether a weight of `module` may have changed since the previous call: a sampled value differs (NaN counts
        as a change), or a tensor was replaced (which the caches see too); False at the first call."""
        kept = self.samples.get(id(module))
        if kept is None or not kept.same_tensors(module):
            self.samples[id(module)] = _Sample(module)
            return kept is not None
        now = kept.read()
        if now is None or torch.equal(now, kept.values):
            return False
        kept.values = now
        return True
