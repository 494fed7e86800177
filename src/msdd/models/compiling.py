"""torch.compile for msdd's networks: whether inductor can compile for a device (`msdd bench --compile`), and a
training step's transformer blocks compiled one by one (`train.compile`, `distill.compile`)."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch._functorch.config
from torch import nn

from msdd.models.layers import JointBlock

# Every block's forward is one code object, whose compiled variants (encoder and decoder blocks, the last ones, each
# resolution, autocast on and off) count against one limit of recompilations (dynamo's default 8: past it, eager)
RECOMPILE_LIMIT = 64


def compiler_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for `device` (no working C++ compiler on the CPU, no triton on CUDA) and how to
    fix it, or None when it can."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # inductor's own check: no g++ / clang++ (or $CXX) that works
            return f"{e}. Install a C++ compiler (e.g. apt install g++) to compile on the CPU"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (pip install triton)"
    return None


def compile_blocks(model: nn.Module, device: torch.device, backend: str | Callable = "inductor",
                   setting: str = "train.compile", keep_graph: bool = False) -> int:
    """Compile every transformer block (`JointBlock`) of `model` in place (`nn.Module.compile`: parameter names and
    state dicts stay as they are). Graphs are made per block rather than per network, so blocks of one form share
    them, and the decoder's passes at several resolutions add a graph per block form, not a whole network's. Returns
    how many blocks were compiled: 0, with a warning naming `setting`, where inductor has no compiler for `device` or
    `model` has no such block (SSDD with its convolutional encoder; SSDD's U-Net always stays eager). `keep_graph`:
    the step runs backward passes that keep the graph for another (`retain_graph`, as the distillers' adaptive
    weight), which AOTAutograd's donated buffers refuse; it turns them off for the process (a memory saving of
    compiled backward passes, nothing else)."""
    blocks = [m for m in model.modules() if isinstance(m, JointBlock)]
    problem = compiler_problem(device) if backend == "inductor" else None
    if problem or not blocks:
        warnings.warn(f"{setting}: training uncompiled: " + (problem or "the model has no transformer blocks"),
                      stacklevel=2)
        return 0
    if keep_graph:
        torch._functorch.config.donated_buffer = False
    for block in blocks:
        block.compile(backend=backend, recompile_limit=RECOMPILE_LIMIT)
    return len(blocks)
