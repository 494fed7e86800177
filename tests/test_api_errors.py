"""Library misuse that a researcher's session found failing deep inside a layer or silently: each is now a ValueError
or TypeError naming the argument, from `Tokenizer`, `OnnxTokenizer` and `AutoencoderMSDD` alike (`msdd.inputs`)."""

import numpy as np
import pytest
import torch
from PIL import Image

from msdd.data import embedded_eval_set
from msdd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("tiny-64")


@pytest.fixture(scope="module")
def z(tok):
    return tok.encode(embedded_eval_set(64)[0][:2])


def test_decode_arguments_are_checked_first(tok, z):
    with pytest.raises(ValueError, match=r"no latents to decode: got an empty batch \(0, 32, 8\)"):
        tok.decode(z[:0])  # before: IndexError inside the decoder
    for seed in (1.5, "3", None, True, torch.tensor(3), 2**64, -2**63 - 1):  # the last two: torch's range, just out
        with pytest.raises(TypeError, match=r"seed must be a whole number \(an int in \[-2\*\*63, 2\*\*64\)\)"):
            tok.decode(z, seed=seed)
    for seed in (-2**63, 2**64 - 1):  # just in
        assert tok.decode(z, seed=seed).shape == (2, 3, 64, 64)
    assert torch.equal(tok.decode(z, seed=np.int64(3)), tok.decode(z, seed=3))
    for generator in (3, "x", np.random.default_rng(0)):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or a list of one per image"):
            tok.decode(z, generator=generator)
    with pytest.raises(ValueError, match=r"one torch.Generator per image \(2\)"):
        tok.decode(z, generator=[torch.Generator(), 5])
    for guidance in ("2", True, [1.0], -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guidance .* must be a finite number >= 0"):
            tok.decode(z, guidance=guidance)
    for flag in ("bf16", "int8", "return_stages"):  # before: "no" and "False" were true, 0.0 false
        for value in ("no", "False", 0.0, None):
            with pytest.raises(TypeError, match=f"{flag} must be True or False, got {value!r}"):
                tok.decode(z, **{flag: value})
    with pytest.raises(TypeError, match="bf16 must be True or False, got 'no'"):
        tok.reconstruct(embedded_eval_set(64)[0][:1], bf16="no")  # encode checks it too
    assert torch.equal(tok.decode(z, bf16=np.bool_(False)), tok.decode(z))
    with pytest.raises(ValueError, match="steps 1,000,000,000 per stage is more than msdd decodes"):
        tok.decode(z, steps=10**9)  # before: the schedule was allocated until the memory ran out


def test_image_inputs_are_checked_first(tok):
    x = embedded_eval_set(64)[0][:1]
    hwc = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    with pytest.raises(ValueError, match=r"look channels-last \(H, W, C\): pass \(3, H, W\)"):
        tok.encode(hwc)
    assert torch.equal(tok.encode(np.ascontiguousarray(hwc.transpose(2, 0, 1))), tok.encode(torch.from_numpy(
        hwc).permute(2, 0, 1)))
    with pytest.raises(ValueError, match="images contain NaN or inf"):  # not "looks like [0, 255]"
        tok.encode(x.masked_fill(x > 0.5, float("inf")))
    with pytest.raises(ValueError, match="no images to encode: got an empty batch"):
        tok.reconstruct(torch.zeros(1, 3, 0, 64))
    # float images: [-1, 1] up to float rounding (1e-3), below as well as above; values of [0, 255] get the fix
    ramp = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    assert tok.encode(ramp * 1.0009).shape == (1, 32, 8)  # within the rounding allowed
    for bad, shown in ((ramp - 0.0011, r"\[-1, 0\.\d+\]"), (ramp + 0.0011, r"\[-0\.\d+, 1\]")):
        with pytest.raises(ValueError, match=r"float images must be in \[-1, 1\], got values in " + shown + "$"):
            tok.encode(bad)
    with pytest.raises(ValueError, match=r"got values in \[0, 255\] \(looks like \[0, 255\]: pass uint8, or x / "
                                         r"127\.5 - 1\)"):
        tok.encode((ramp + 1) * 127.5)
    with pytest.raises(ValueError, match=r"an image of size \(0, 0\) has no pixels"):
        tok.reconstruct([Image.new("RGB", (0, 0))])


def test_tiled_reconstruct_arguments(tok):
    x = torch.zeros(1, 3, 80, 80)
    with pytest.raises(ValueError, match="returns the final images: pass seed=, not generator= or return_stages="):
        tok.reconstruct(x, return_stages=True)  # before: AttributeError in tiles.py
    for overlap in (16.5, "16", True, 64, 33):
        with pytest.raises(ValueError, match=r"tile_overlap must be a whole number of pixels in \[0, 32\]"):
            tok.reconstruct(x, tile_overlap=overlap)
    with pytest.raises(TypeError, match="seed must be a whole number"):
        tok.reconstruct(x, seed="a")  # before: hashed as a string
    assert tok.reconstruct(x, seed=np.int64(2)).shape == (1, 3, 80, 80)


def test_diffusers_decode_takes_one_latent_and_its_generator(tok, z):
    pytest.importorskip("diffusers")
    from msdd.integrations.diffusers import AutoencoderMSDD

    vae = AutoencoderMSDD.from_tokenizer(tok)
    one = vae.decode(z[0], generator=[torch.Generator().manual_seed(4)]).sample  # an unbatched latent (32, 8)
    assert torch.equal(one, tok.decode(z[:1], generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match=r"one torch.Generator per image \(2\)"):
        vae.decode(z, generator=[torch.Generator()])


def test_onnx_tokenizer_checks_what_tokenizer_checks(tok, z, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from msdd.integrations.onnx import OnnxTokenizer, export_onnx

    ort_tok = OnnxTokenizer(export_onnx("tiny-64", tmp_path / "onnx"))
    x = embedded_eval_set(64)[0][:2]
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert (ort_tok.encode(as_uint8) - tok.encode(as_uint8)).abs().max() < 1e-4  # before: latents of pixels 0..255
    with pytest.raises(ValueError, match=r"looks like \[0, 255\]"):
        ort_tok.encode(as_uint8.float())
    with pytest.raises(ValueError, match="images contain NaN or inf"):
        ort_tok.encode(x * float("nan"))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 64, 64\)"):
        ort_tok.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="latents contain 512 NaN"):
        ort_tok.decode(z * float("nan"))
    with pytest.raises(TypeError, match="latents must be a float tensor"):
        ort_tok.decode(z.long())
    with pytest.raises(ValueError, match="no latents to decode"):
        ort_tok.decode(z[:0])
    with pytest.raises(TypeError, match="seed must be a whole number"):
        ort_tok.decode(z, seed=1.5)
    assert ort_tok.decode(z.clone().requires_grad_(True)).shape == (2, 3, 64, 64)  # before: "Can't call numpy()"


def test_latent_normalisation_checks_the_shape(tok, z):
    assert torch.allclose(tok.denormalize_latents(tok.normalize_latents(z)), z, atol=1e-5)
    assert torch.equal(tok.normalize_latents(z.reshape(-1, 8)), tok.normalize_latents(z).reshape(-1, 8))  # tokens
    for bad in (torch.zeros(2, 8, 32), z.numpy()):  # transposed; an array
        with pytest.raises(ValueError, match=r"latents must have their 8 channels last for this model"):
            tok.normalize_latents(bad)


def test_a_decode_warning_points_at_the_callers_line():
    student = Tokenizer.from_pretrained("tiny-64-student")
    z = torch.zeros(1, *student.config.latent_shape)
    with pytest.warns(UserWarning, match="distilled for one step per stage") as record:
        student.decode(z, steps=2)
    assert record[0].filename == __file__  # was: torch's no_grad wrapper (torch/utils/_contextlib.py)


def test_numpy_images_as_numpy_makes_them(tok):
    """Arrays that torch.from_numpy refuses as they are (negative strides from a BGR flip, big-endian) are taken;
    channels-last batches and arrays of objects get errors that say what to pass."""
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    z = tok.encode(rgb)
    assert torch.equal(tok.encode(np.ascontiguousarray(rgb[:, ::-1])[:, ::-1]), z)  # a view with negative strides
    assert torch.equal(tok.encode(rgb[:, ::-1].copy()[:, ::-1]), z)
    as_float = rgb.astype(np.float32) / 127.5 - 1
    assert torch.allclose(tok.encode(as_float.astype(">f4")), tok.encode(as_float))
    with pytest.raises(ValueError,
                       match=r"look channels-last \(B, H, W, C\): pass \(B, 3, H, W\).*permute\(0, 3, 1, 2\)"):
        tok.encode(rgb.transpose(0, 2, 3, 1))
    with pytest.raises(TypeError, match="numpy dtype object"):
        tok.encode(np.empty((1, 3, 64, 64), dtype=object))
    assert tok.reconstruct(torch.zeros(1, 3, 70, 90), tile_overlap=np.int64(8)).shape == (1, 3, 70, 90)
