"""The shipped tiny-64 models (src/msdd/pretrained, model card there): a regression test of the weights,
the decoder and the sampler together. The decodes are seeded, so their scores are the model card's numbers to the
card's rounding: a change of the decode that moves them, for better or worse, changes the card too."""

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
MARGIN_DB = 0.5  # how far below the card a broken decoder must fall


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
    assert r["metrics"]["psnr"] == pytest.approx(27.80, abs=0.01)  # the card rounds to 0.01 dB (0.001 in SSIM)
    assert r["metrics"]["ssim"] == pytest.approx(0.721, abs=0.001)
    assert r["protocol"]["decoder_passes_per_image"] == 4


def test_shipped_teacher_and_student_share_the_encoder_and_beat_a_broken_decoder():
    teacher, student = Tokenizer.from_pretrained("tiny-64-teacher"), Tokenizer.from_pretrained("tiny-64-student")
    images, _ = embedded_eval_set(64)
    x = images[:3]  # the three whole photos, (3, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        z_t, z_s = teacher.encode(x), student.encode(x)
    torch.testing.assert_close(z_t, z_s)
    r = evaluate(teacher, "embedded", batch_size=42, steps=2)
    assert r["metrics"]["psnr"] == pytest.approx(26.94, abs=0.01)
    assert r["metrics"]["ssim"] == pytest.approx(0.667, abs=0.001)
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


def test_uint8_images_encode_as_the_same_pixels_in_floats():
    """`encode` takes uint8 [0, 255] or float [-1, 1]: the same pixels either way give the same latents (uint8 v
    means v / 127.5 - 1, the training data's mapping), and floats a little outside [-1, 1] (e.g. [0, 1.2] data
    rescaled wrongly) are refused rather than encoded."""
    from msdd.data.images import to_tensor

    tok = Tokenizer.from_pretrained("tiny-64")
    pixels = torch.randint(0, 256, (2, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    floats = torch.stack([to_tensor(p.numpy()) for p in pixels])
    with torch.no_grad():
        torch.testing.assert_close(tok.encode(pixels.permute(0, 3, 1, 2)), tok.encode(floats), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
            tok.encode(floats * 1.2)


def test_fetch_weights_copies_the_file_into_the_torch_hub_cache_once(tmp_path, monkeypatch, capsys):
    """`msdd fetch-weights NAME` downloads the file with torch's downloader (here from a file:// address: no network)
    to the torch hub cache, where `resolve_weights` finds it, prints where it is, and leaves a file already there."""
    import dataclasses

    import msdd.weights
    from msdd.cli import main
    from msdd.weights import PRETRAINED, cache_path, resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = tmp_path / "served" / "vgg16-397923af.pth"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    spec = dataclasses.replace(PRETRAINED["vgg16"], url=source.as_uri())
    monkeypatch.setitem(msdd.weights.PRETRAINED, "vgg16", spec)
    dest = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert cache_path(spec) == dest and not dest.exists()
    assert main(["fetch-weights", "vgg16"]) == 0
    assert capsys.readouterr().out == f"vgg16: {dest}\n"
    assert dest.read_bytes() == b"weights" and resolve_weights("vgg16") == dest
    source.unlink()  # a second fetch finds the file in the cache and downloads nothing
    assert main(["fetch-weights", "vgg16"]) == 0
    assert capsys.readouterr().out == f"vgg16: {dest}\n" and dest.read_bytes() == b"weights"


def test_a_pretrained_file_must_be_a_state_dict_of_tensors(tmp_path):
    """`load_tensor_file` reads tensors only: a torch file of tensors or a .safetensors file; a list of tensors or a
    dict with a value that is not a tensor is refused by name, and a pickled object is never unpickled."""
    import argparse

    from safetensors.torch import save_file

    from msdd.weights import load_tensor_file

    state = {"features.0.weight": torch.randn(2, 3)}
    torch.save(state, tmp_path / "a.pth")
    save_file(state, tmp_path / "a.safetensors")
    for name in ("a.pth", "a.safetensors"):
        loaded = load_tensor_file(tmp_path / name, "vgg16")
        assert loaded.keys() == state.keys() and torch.equal(loaded["features.0.weight"], state["features.0.weight"])
    for value, kind in [([torch.zeros(1)], "list"), ({"w": torch.zeros(1), "step": 3}, "dict")]:
        torch.save(value, tmp_path / "b.pth")
        with pytest.raises(ValueError, match=rf"--vgg-weights .*b.pth holds a {kind}, not a state dict of tensors: "
                                             "give vgg16-397923af.pth"):
            load_tensor_file(tmp_path / "b.pth", "vgg16")
    torch.save({"net": argparse.Namespace(a=1)}, tmp_path / "c.pth")
    refused = r"--dino-weights .*c.pth is not a plain tensor state dict \(UnpicklingError\); refusing to load it: give"
    with pytest.raises(ValueError, match=rf"{refused} dino_deitsmall16_pretrain.pth \(https://.*\) or its .safet"):
        load_tensor_file(tmp_path / "c.pth", "dino_vits16")


def test_pretrained_files_are_found_explicit_path_first_then_env_then_caches(tmp_path, monkeypatch):
    """Where `resolve_weights` looks for a pretrained file: the option's path first (even when the environment
    variable names another file), then $MSDD_..._WEIGHTS, then the torch hub cache, then timm's copy in the Hugging
    Face cache (found offline, as a user who ran timm has it); and a missing option path is an error, not a reason
    to fall back to the environment."""
    import huggingface_hub.constants

    from msdd.weights import PRETRAINED, cache_path, resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = PRETRAINED["dino_vits16"]
    explicit, env = tmp_path / "mine.pth", tmp_path / "env.pth"
    explicit.write_bytes(b"x")
    env.write_bytes(b"x")
    monkeypatch.setenv(spec.env, str(env))
    assert resolve_weights("dino_vits16", explicit) == explicit
    with pytest.raises(FileNotFoundError, match=f"{spec.option} .*nope.pth: no such file"):
        resolve_weights("dino_vits16", tmp_path / "nope.pth")
    assert resolve_weights("dino_vits16") == env
    monkeypatch.delenv(spec.env)
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        resolve_weights("dino_vits16")
    repo = tmp_path / "hf" / f"models--{spec.hf_repo.replace('/', '--')}"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / spec.hf_file).write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert resolve_weights("dino_vits16") == repo / "snapshots" / "abc" / spec.hf_file
    cache_path(spec).parent.mkdir(parents=True)
    cache_path(spec).write_bytes(b"x")
    assert resolve_weights("dino_vits16") == cache_path(spec)
