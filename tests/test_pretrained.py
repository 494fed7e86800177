"""The shipped tiny-64 models (src/msdd/pretrained, model card there): a regression test of the weights,
the decoder and the sampler together. Thresholds are the model card's numbers minus a margin."""

import pytest
import torch

from msdd import Tokenizer
from msdd.config import load_config
from msdd.data.embedded import embedded_eval_set
from msdd.eval.evaluate import evaluate
from msdd.eval.metrics import psnr_per_image
from msdd.eval.stages import stage_fidelity
from msdd.hub import BUNDLED, resolve_model_dir

# Model card (held-out set, seed 0, fp32): student 27.80 dB / SSIM 0.721; teacher at 2 steps 26.94 / 0.667.
MARGIN_DB = 0.5


def test_default_model_is_the_bundled_one_step_student():
    tok = Tokenizer.from_pretrained()
    assert resolve_model_dir(None) == BUNDLED["tiny-64-student"]
    assert tok.config.one_step and tok.default_steps() == (1, 1, 1, 1)
    assert tok.metadata["weights_dtype"] == "fp16" and tok.metadata["stage"] == 2
    assert all(p.dtype == torch.float32 for p in tok.parameters())


def test_shipped_student_reconstructs_held_out_photos():
    tok = Tokenizer.from_pretrained("tiny-64")
    r = evaluate(tok, "embedded", batch_size=42, model_path="tiny-64")
    assert r["protocol"]["images"] == 42 and r["protocol"]["checkpoint_sha256"]
    assert r["metrics"]["psnr"] > 27.80 - MARGIN_DB
    assert r["metrics"]["ssim"] > 0.721 - 0.02
    assert r["protocol"]["decoder_passes_per_image"] == 4


def test_shipped_teacher_and_student_share_the_encoder_and_beat_a_broken_decoder():
    teacher, student = Tokenizer.from_pretrained("tiny-64-teacher"), Tokenizer.from_pretrained("tiny-64-student")
    images, _ = embedded_eval_set(64)
    x = images[:3]  # the three whole photos, (3, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        z_t, z_s = teacher.encode(x), student.encode(x)
    torch.testing.assert_close(z_t, z_s)
    r = evaluate(teacher, "embedded", batch_size=42, steps=2)
    assert r["metrics"]["psnr"] > 26.94 - MARGIN_DB
    # the same decode with the decoder's weights scrambled must fall well below: the threshold can fail
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.decoder.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    broken = evaluate(teacher, "embedded", batch_size=42, steps=2)
    assert broken["metrics"]["psnr"] < 26.94 - MARGIN_DB


@pytest.mark.parametrize("name", ["tiny-64-teacher", "tiny-64-student"])
def test_model_card_lists_the_shipped_models(name):
    card = (BUNDLED[name].parent / "README.md").read_text()
    assert f"`{name}`" in card


def test_stage_fidelity_traces_the_real_decode():
    tok = Tokenizer.from_pretrained("tiny-64-teacher")
    images, _ = embedded_eval_set(64)
    x = images[:6]
    rows = stage_fidelity(tok, x, steps=2, seed=3)
    assert [r["resolution"] for r in rows] == [8, 16, 32, 64] and rows[-1]["noise_level"] == 0.0
    assert rows[0]["psnr"] == rows[0]["coarse_psnr"]  # the first stage is already at the coarse size
    decoded = tok.decode(tok.encode(x), steps=2, seed=3)
    assert rows[-1]["psnr"] == pytest.approx(psnr_per_image(decoded, x).mean().item(), abs=1e-4)
    assert rows[0]["psnr"] > 24.0  # benchmarks/results/stage-drift-*.json: 28-30 dB after the first stage
    with pytest.raises(ValueError, match="msdd"):
        stage_fidelity(Tokenizer(load_config("ssdd-tiny-64").model), x)
