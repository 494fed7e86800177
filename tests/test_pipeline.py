"""`msdd bench --pipeline`: a latent generator before each decoder, its FLOP accounting and time split."""

import contextlib
import io
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from msdd.cli import main
from msdd.generator import GeneratorConfig, build_generator, load_gen_config, sample_latents, sampling_flops
from msdd.models.layers import unoptimised


def _bench(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", "--quick", "--threads", "1", "--rounds", "2", "--json", str(out), *args]) == 0
    return json.loads(out.read_text()), stdout.getvalue()


def _counted(fn, *args, **kwargs) -> int:
    """FLOPs of running fn, on the reference path (FlopCounterMode does not see oneDNN's linear kernel)."""
    with (torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), unoptimised(),
          FlopCounterMode(display=False) as counter):
        fn(*args, **kwargs)
    return counter.get_total_flops()


def test_sampling_flops_equal_a_count_of_real_sampling():
    model = build_generator(GeneratorConfig(width=32, depth=2, heads=2, mlp_hidden=64, num_classes=5), (16, 4))
    for steps, guidance in ((3, 1.0), (3, 2.0), (2, 0.5)):
        real = _counted(sample_latents, model, 2, steps, guidance, generator=torch.Generator().manual_seed(0))
        assert sampling_flops(model, steps, guidance, batch=2) == real > 0


@pytest.mark.slow
def test_pipeline_rows_add_generator_and_decoder(tmp_path):
    rows = ("student", "teacher", "ssdd-student", "sd-vae")
    report, stdout = _bench(tmp_path, "--pipeline", "--gen-steps", "3")
    plain, _ = _bench(tmp_path, "--contenders", ",".join(rows))
    assert report["pipeline"] == {"preset": "gen-tiny", "steps": 3, "guidance": 1.0,  # gen-tiny: unconditional
                                  "guidance_note": "--gen-cfg 1.5 does not apply: the generator is unconditional"}
    assert [r["name"] for r in report["contenders"]] == list(rows)
    decoder_only = {r["name"]: r for r in plain["contenders"]}
    gen_config = load_gen_config("gen-tiny").generator
    for r in report["contenders"]:
        if "error" in r:  # the SD-VAE without diffusers
            assert r["name"] == "sd-vae"
            continue
        latent = r.get("latent") or [32, 8]  # msdd's tiny-64 tokens, or the row's grid latent
        gen = build_generator(gen_config, latent)
        x = torch.zeros(1, *latent)
        per_pass = _counted(gen, x, torch.zeros(1))
        assert r["generator_gflop_per_pass"] == pytest.approx(per_pass / 1e9, rel=1e-5)
        assert r["generator_gflop_per_img"] == pytest.approx(3 * per_pass / 1e9, rel=1e-5)  # 3 steps, 1 pass each
        assert r["decoder_gflop_per_img"] == pytest.approx(decoder_only[r["name"]]["gflop_per_img"], rel=1e-5)
        assert r["gflop_per_img"] == pytest.approx(r["generator_gflop_per_img"] + r["decoder_gflop_per_img"], rel=1e-5)
        assert 0 < r["decoder_share"] < 1 and 0 < r["generator_seconds_median"] < r["seconds_median"]
        parts = r["generator_seconds_median"] + r["decoder_seconds_median"]
        assert parts == pytest.approx(r["seconds_median"], rel=1e-4)
        assert "generator_seconds" not in r  # the raw per-call list is folded into the medians
        assert r["name"] in stdout
    assert "end to end: gen-tiny generator (3 steps, cfg 1)" in stdout
    assert "--pipeline --gen-steps 3" in report["command"]


@pytest.mark.parametrize("args, match", [
    (["--contenders", "encoder"], "cannot follow a generator"),
    (["--gen-steps", "0"], "--gen-steps"),
    (["--resolutions", "32,64"], "--resolutions"),
])
def test_pipeline_bad_options(tmp_path, capsys, args, match):
    assert main(["bench", "--quick", "--pipeline", "--json", str(tmp_path / "b.json"), *args]) == 2
    assert match in capsys.readouterr().err
