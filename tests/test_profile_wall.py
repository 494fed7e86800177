"""benchmarks/profile_student.py --wall: the clock breakdown covers every stage's linear layers and attention, with
the FLOPs the model's shapes give and PyTorch's FLOP counter counts."""

import importlib.util
from pathlib import Path

import pytest
import torch

from msdd.eval.flops import flop_counter
from msdd.families import family_of
from msdd.models.layers import unoptimised

from conftest import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_student.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_student", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wall_breakdown_covers_every_stage_and_counts_the_decodes_flops():
    cfg = tiny_config().model
    family = family_of(cfg)
    torch.manual_seed(0)
    decoder = family.build_decoder().eval()
    z = torch.randn(2, *cfg.latent_shape)
    steps = (1,) * family.num_step_entries

    def decode():
        with torch.inference_mode():
            family.sample(decoder, z, steps, 1.0, torch.Generator().manual_seed(0))

    decode()  # fills the modulation cache, as the script's warm-up does
    profile = _script()
    result = profile.wall_breakdown(decoder, decode, rounds=2)
    rows = {(r["tokens"], r["stream"], r["kind"]): r for r in result["rows"]}
    stages = sorted({t for t, _, kind in rows if kind == "attention"})
    assert len(stages) == cfg.flow.num_stages
    assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in result["rows"])
    assert 0 < result["rest_seconds"] < result["seconds_per_decode_hooked"]
    # each stage's streams: 2 x rows x the stream's weights (its adaLN vectors come from the cache)
    weights = {s: sum(m.in_features * m.out_features for n, m in decoder.named_modules()
                      if isinstance(m, torch.nn.Linear) and f".{s}." in n and not n.endswith("adaln"))
               for s in ("img", "ctx")}
    batch, context = z.shape[0], cfg.latent_shape[0]
    for tokens in stages:
        assert rows[tokens, "image", "linear"]["gflop"] * 1e9 == pytest.approx(2 * batch * tokens * weights["img"])
        assert rows[tokens, "context", "linear"]["gflop"] * 1e9 == pytest.approx(2 * batch * context * weights["ctx"])
    # attention: PyTorch's FLOP counter on the same decode agrees
    with torch.inference_mode(), unoptimised(), flop_counter() as counter:
        decode()
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    timed = sum(r["gflop"] for r in result["rows"] if r["kind"] == "attention") * 1e9
    assert timed == pytest.approx(counted)
    printed = profile.with_peak(result, peak=1e-3)  # GFLOP/s: a peak no row falls below, however slow the machine
    assert printed["decode_fraction_of_peak"] > 0 and all(r["fraction_of_peak"] > 0 for r in printed["rows"])
