"""The blocks op's phase clocks (`MSDD_CPU_KERNELS=phases`, `benchmarks/profile_student.py --phases`): a build of the
same kernels with clocks, which a process loads instead of the plain one, so the script runs in a process of its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msdd.config import load_config
from msdd.eval.flops import flop_counter
from msdd.families import family_of
from msdd.models import cpu_kernels
from msdd.models.layers import unoptimised

ROOT = Path(__file__).resolve().parents[1]


def _blocks_flops(preset: str) -> float:
    """FLOPs of a one-step-per-stage decode's MMDiT blocks on the reference path, counted by torch's FLOP counter in
    the blocks' forwards (the decoder computes their modulation vectors outside them)."""
    cfg = load_config(preset).model
    family = family_of(cfg)
    torch.manual_seed(0)
    decoder = family.build_decoder().eval()
    z = torch.randn(1, *cfg.latent_shape)
    with torch.inference_mode(), unoptimised(), flop_counter() as counter:
        family.sample(decoder, z, (1,) * family.num_step_entries, 1.0, torch.Generator().manual_seed(0))
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if re.search(r"\.blocks\.\d+$", name))


@pytest.mark.skipif(not (cpu_kernels.cpu_supported() and cpu_kernels.library() is not None),
                    reason="msdd's CPU kernels do not run here")
def test_the_phase_clocks_account_for_the_blocks_op(tmp_path):
    out = tmp_path / "phases.json"
    env = {k: v for k, v in os.environ.items() if k != cpu_kernels.ENV}  # the script asks for the clocked build
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_student.py"), "--preset", "tiny-64", "--phases",
                    "--dtype", "bf16", "--rounds", "2", "--out", str(out)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rows = result["rows"]
    # every stage ran the op: the 4-token one by its qkv layers and joint_attention, the others' qkv layers packed
    assert sorted({r["tokens"] for r in rows}) == [4, 16, 64, 256]
    for tokens in (4, 16, 64, 256):
        stage = {r["kind"]: r for r in rows if r["tokens"] == tokens}
        assert all(stage[phase]["seconds"] > 0 for phase in cpu_kernels.PHASES), stage  # each phase was clocked
        assert stage["op, outside its phases"]["seconds"] >= -1e-5  # the phases lie inside the op's call
    assert 0 < result["blocks_op_seconds"] < result["seconds_per_decode_hooked"]
    # the FLOPs behind its GFLOP/s are the counter's (the last block's context stream: keys and values, all queries)
    assert result["gflop_per_decode"] == pytest.approx(_blocks_flops("tiny-64") / 1e9, rel=1e-3)
