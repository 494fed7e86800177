"""FLOP counts (`msdd.eval.flops`, `msdd info`, the `msdd bench` rows) against an independent count:
torch's FlopCounterMode around the real decode, run with SDPA forced onto its math kernel so that
attention runs as plain batched matmuls the counter sees. The package instead counts one decoder pass
per stage on zero inputs, maps the fused CPU attention kernel to the SDPA formula and multiplies by the
steps and the guidance factor; neither its formula nor its custom mapping is used here."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from msdd.cli import main
from msdd.config import load_config
from msdd.eval.flops import decode_flops
from msdd.models.layers import unoptimised
from msdd.tokenizer import Tokenizer

from conftest import tiny_config


def counted(fn, *args, **kwargs) -> int:
    """FLOPs of actually running fn(*args, **kwargs), attention included through the math SDPA kernel.
    On the reference path: the FLOP counts are the network's, every adaLN product per sample and pass, which
    the optimised path's modulation cache skips after a decode's first call (0.2% of a paper-256 decode), the
    linear path's image at every pass (computed once per stage on the optimised path), and FlopCounterMode does not
    see the optimised path's oneDNN linear kernel."""
    with (torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), unoptimised(),
          FlopCounterMode(display=False) as counter):
        fn(*args, **kwargs)
    return counter.get_total_flops()


class CountingDecoder(torch.nn.Module):
    """Wraps a decoder; counts decoder passes per image (a guided step's doubled batch counts twice)."""

    def __init__(self, decoder, batch: int):
        super().__init__()
        self.decoder, self.batch, self.passes = decoder, batch, 0.0

    def forward(self, x, tau, z):
        self.passes += x.shape[0] / self.batch
        return self.decoder(x, tau, z)

    def null_like(self, z):
        return self.decoder.null_like(z)


@pytest.mark.parametrize("steps, guidance", [((1, 1, 1), 1.0), ((2, 1, 3), 2.0), ((2, 2, 2), 0.0)])
def test_decode_flops_equal_a_count_of_the_real_decode(steps, guidance):
    # 32 px, 3 stages, linear path; frozen (FlopCounterMode's module tracker cannot hook the un-guided
    # pass's null context, a parameter, under inference mode otherwise)
    tok = Tokenizer(tiny_config().model).eval().requires_grad_(False)
    z = torch.randn(2, 8, 4)
    real = counted(tok.decode, z, steps=list(steps), guidance=guidance)
    assert real > 0
    assert decode_flops(tok, steps, guidance, batch=2) == real
    assert decode_flops(tok, steps, guidance) * 2 == real


def test_ssdd_decode_flops_equal_a_count_of_the_real_decode():
    tok = Tokenizer(load_config("ssdd-tiny-64", ["model.image_size=32"]).model).eval()
    z = torch.randn(1, *tok.config.latent_shape)
    assert decode_flops(tok, (2,), 1.0) == counted(tok.decode, z, steps=2) > 0


def test_info_gflops_equal_a_count_of_the_real_decode(capsys):
    """`msdd info` on the tiny-64 preset (GFLOPs rounded to 3 decimals): the guided decode, the one-step
    decode and every stage's pass, each against a count of running it."""
    over = ["model.sampling.steps=[1,2,1,1]", "model.sampling.cfg=2.0"]
    assert main(["info", "--preset", "tiny-64", *[a for o in over for a in ("--set", o)]]) == 0
    info = json.loads(capsys.readouterr().out)
    tok = Tokenizer(load_config("tiny-64", over).model).eval()
    z = torch.randn(1, 32, 8)
    gflop = lambda n: n / 1e9  # noqa: E731
    assert info["decode"]["gflop_per_image"] == pytest.approx(gflop(counted(tok.decode, z)), abs=6e-4)
    one_step = counted(tok.decode, z, steps=[1, 1, 1, 1], guidance=1.0)
    assert info["decode"]["one_step_gflop_per_image"] == pytest.approx(gflop(one_step), abs=6e-4)
    for stage, w in zip(info["stages"], tok.windows):
        x = torch.zeros(1, 3, w.resolution, w.resolution)
        assert stage["gflop_per_pass"] == pytest.approx(gflop(counted(tok.decoder, x, torch.zeros(1), z)), abs=6e-4)
    # the head: sizes, parameters and the encoder's FLOPs of the same network
    params = lambda net: round(sum(p.numel() for p in net.parameters()) / 1e6, 3)  # noqa: E731
    assert (info["image_size"], info["latent"], info["compression"], info["one_step"]) == (64, [32, 8], 48.0, False)
    assert (info["params_encoder_M"], info["params_decoder_M"]) == (params(tok.encoder), params(tok.decoder))
    assert info["params_encoder_M"] != info["params_decoder_M"]
    encode = counted(tok.encoder, torch.zeros(1, 3, 64, 64))
    assert info["encoder_gflop_per_image"] == pytest.approx(gflop(encode), abs=6e-4) and encode > 1e6


def test_ssdd_info_gflops_equal_a_count_of_the_real_decode(capsys):
    assert main(["info", "--preset", "ssdd-tiny-64", "--set", "model.ssdd.steps=2"]) == 0
    info = json.loads(capsys.readouterr().out)
    d = info["decode"]
    tok = Tokenizer(load_config("ssdd-tiny-64", ["model.ssdd.steps=2"]).model).eval()
    z = torch.randn(1, *tok.config.latent_shape)
    assert info["gflop_per_pass"] == pytest.approx(counted(tok.decode, z, steps=1) / 1e9, abs=6e-4)  # one pass
    assert d["steps"] == 2
    assert d["gflop_per_image"] == pytest.approx(counted(tok.decode, z) / 1e9, abs=6e-4)
    assert d["one_step_gflop_per_image"] == pytest.approx(counted(tok.decode, z, steps=1) / 1e9, abs=6e-4)


def test_plain_info_gflops_equal_a_count_of_the_real_decode(capsys):
    """`msdd info` of the single-scale baseline (model.family=plain): one pass per image, whatever steps and cfg."""
    over = ["model.family=plain", "model.sampling.cfg=2.0"]
    assert main(["info", "--preset", "tiny-64", *[a for o in over for a in ("--set", o)]]) == 0
    info = json.loads(capsys.readouterr().out)
    tok = Tokenizer(load_config("tiny-64", over).model).eval()
    decode = counted(tok.decode, torch.randn(1, 32, 8))
    assert info["decode"] == {"passes": 1, "gflop_per_image": pytest.approx(decode / 1e9, abs=6e-4)}
    assert decode > 1e6 and info["params_decoder_M"] == round(sum(p.numel() for p in tok.decoder.parameters()) / 1e6, 3)


def test_encoder_flops_equal_a_count_of_the_real_encode():
    """`encoder_flops(tok, batch)`: the FLOPs of encoding `batch` images, twice one image's for two."""
    from msdd.eval.flops import encoder_flops

    tok = Tokenizer(tiny_config().model)
    assert encoder_flops(tok, batch=2) == counted(tok.encoder, torch.zeros(2, 3, 32, 32)) == 2 * encoder_flops(tok)


def test_bench_flow_rows_count_what_they_time(tmp_path):
    """The student / teacher / teacher-nocfg rows of a trained model (--model): FLOPs and passes per image
    of the row equal a count of its own timed decode call."""
    from msdd.eval.bench.contenders import flow_contender
    from msdd.eval.bench.models import FlowModel

    Tokenizer(tiny_config().model).save_pretrained(tmp_path / "m")
    model = FlowModel.load(str(tmp_path / "m"), torch.device("cpu"))
    z = torch.randn(2, 8, 4)
    for steps, cfg in [((1, 1, 1), 1.0), ((2, 2, 2), 2.0), ((2, 2, 2), 1.0), ((1, 3, 2), 1.5)]:
        decoder = CountingDecoder(model.decoder, batch=2)
        c = flow_contender("row", model, decoder, z, steps, cfg)
        assert counted(c.decode) == 2 * c.flop_per_image, (steps, cfg)
        assert c.info["passes_per_image"] == decoder.passes, (steps, cfg)


def test_bench_ssdd_rows_count_what_they_time():
    from msdd.eval.bench.contenders import ssdd_config, ssdd_contender

    config = ssdd_config("ssdd-tiny-64", 32)
    for steps in (1, 3):
        c = ssdd_contender("ssdd", config, steps, 2, torch.device("cpu"))
        assert counted(c.decode) == 2 * c.flop_per_image and c.info["passes_per_image"] == steps


def test_bench_rows_of_a_random_preset_count_what_they_time():
    """The default `msdd bench` (random weights of a preset, FlowModel.random) times the decoder the family
    builds, linear path included, the one its FLOPs are counted on (it once timed a bare Decoder)."""
    from msdd.eval.bench.contenders import flow_contender
    from msdd.eval.bench.models import FlowModel

    config = tiny_config().model
    assert config.uses_linear_path
    model = FlowModel.random(config, torch.device("cpu"))
    z = torch.randn(2, 8, 4)
    c = flow_contender("student", model, model.decoder, z, (1, 1, 1), 2.0)
    assert counted(c.decode) == 2 * c.flop_per_image
