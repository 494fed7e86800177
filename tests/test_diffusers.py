"""msdd.integrations.diffusers: `AutoencoderMSDD` against `Tokenizer`, diffusers' folder layout, the
conversions both ways, the latent scale, every family, and diffusers staying an optional import."""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from msdd import Tokenizer  # noqa: E402
from msdd.config import load_config  # noqa: E402
from msdd.integrations.diffusers import (  # noqa: E402
    AutoencoderMSDD,
    DeterministicLatent,
    import_diffusers,
)
from conftest import tiny_config  # noqa: E402


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def student():
    return Tokenizer.from_pretrained("tiny-64-student")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=gen(1)) * 2 - 1


@pytest.fixture
def offline(monkeypatch):
    """No network: any socket connection fails (loading from a local folder must not try one)."""
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_round_trip_matches_tokenizer(student, images):
    vae = AutoencoderMSDD.from_tokenizer(student)
    out = vae.encode(images)
    assert isinstance(out.latent_dist, DeterministicLatent)
    z = out.latent_dist.mode()
    assert torch.equal(z, student.encode(images))
    assert torch.equal(out.latent_dist.sample(gen(5)), z) and torch.equal(out.latent_dist.mean, z)
    assert torch.equal(out.latent_dist.std, torch.zeros_like(z)) and torch.equal(out.latent_dist.kl(), torch.zeros(2))
    assert torch.equal(vae.encode(images, return_dict=False)[0].mode(), z)
    assert z.shape == (2, 32, 8)
    x = vae.decode(z, generator=gen(0)).sample
    assert torch.equal(x, student.decode(z, generator=gen(0)))
    assert x.shape == images.shape and x.min() >= -1 and x.max() <= 1
    assert torch.equal(vae.decode(z, generator=gen(0), return_dict=False)[0], x)
    assert torch.equal(vae(images, generator=gen(0)).sample, x)
    assert torch.equal(vae(images, generator=gen(3)).sample, student.decode(z, generator=gen(3)))  # its generator
    # num_inference_steps is msdd's steps; a list of generators is one per image
    with pytest.warns(UserWarning, match="distilled for one step"):
        x2 = vae.decode(z, generator=gen(3), num_inference_steps=2).sample
    assert torch.equal(x2, student.decode(z, steps=[2, 2, 2, 2], generator=gen(3)))
    guided = vae.decode(z, generator=gen(3), num_inference_steps=2, guidance=2.0).sample  # warned once, above
    assert torch.equal(guided, student.decode(z, steps=2, guidance=2.0, generator=gen(3)))
    assert (guided - x2).abs().max() > 1e-3  # guidance reaches the decode
    per_image = vae.decode(z, generator=[gen(7), gen(8)]).sample
    assert torch.equal(per_image[1:], student.decode(z[1:], generator=gen(8)))
    # the wrapper shares the Tokenizer's weights, and gives it back with its metadata
    assert vae.to_tokenizer() is student and vae.to_tokenizer().metadata["stage"] == 2


def test_the_wrapper_takes_the_tokenizers_mode():
    """`from_tokenizer` wraps the module as it is: an eval-mode Tokenizer gives an eval-mode model (diffusers'
    pipelines and `vae.training` read the wrapper's flag), a training one a training one."""
    tok = Tokenizer(tiny_config().model)
    for mode in (False, True):
        vae = AutoencoderMSDD.from_tokenizer(tok.train(mode))
        assert vae.training == mode and all(m.training == mode for m in vae.modules())


def test_save_load_and_conversions(student, images, tmp_path, offline):
    vae = AutoencoderMSDD.from_tokenizer(student)
    vae.save_pretrained(tmp_path / "vae")
    files = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderMSDD" and cfg["msdd_config"]["family"] == "msdd"
    assert cfg["msdd_metadata"]["stage"] == 2 and "model" not in cfg["msdd_metadata"]
    loaded = AutoencoderMSDD.from_pretrained(tmp_path / "vae")
    assert not loaded.training and loaded.config.scaling_factor == vae.config.scaling_factor
    z = student.encode(images)
    assert torch.equal(loaded.decode(z, generator=gen(0)).sample, vae.decode(z, generator=gen(0)).sample)

    from msdd.cli import main

    exported = tmp_path / "exported"
    assert main(["export", "--model", "tiny-64-student", "--out", str(exported), "--format", "diffusers"]) == 0
    weights, config = exported / "diffusion_pytorch_model.safetensors", exported / "config.json"
    assert weights.stat().st_mode & 0o777 == config.stat().st_mode & 0o777  # shareable like its config, not 0600
    import_diffusers(tmp_path / "exported", tmp_path / "msdd")
    back = Tokenizer.from_pretrained(tmp_path / "msdd")
    own, theirs = student.state_dict(), back.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
    assert back.config == student.config
    assert back.metadata["teacher_sha256"] == student.metadata["teacher_sha256"]
    assert back.metadata["stage"] == student.metadata["stage"] == 2
    # a ModelConfig given directly is stored as its dict, as from_tokenizer stores it
    from msdd.config import to_dict

    direct = AutoencoderMSDD(msdd_config=student.config)
    assert direct.config.msdd_config == to_dict(student.config) == vae.config.msdd_config
    direct.save_pretrained(tmp_path / "direct")
    assert json.loads((tmp_path / "direct" / "config.json").read_text())["msdd_config"] == to_dict(student.config)


def test_scaling_factor_as_pipelines_use_it():
    tok = Tokenizer(tiny_config().model)  # latent_dim 4: per-channel statistics set by hand
    tok.latent_mean.copy_(torch.tensor([0.5, -0.3, 1.0, 0.2]))
    tok.latent_std.copy_(torch.tensor([2.0, 2.5, 3.0, 2.5]))
    cfg = AutoencoderMSDD.from_tokenizer(tok).config
    assert cfg.scaling_factor == pytest.approx(1 / ((2.0 + 2.5 + 3.0 + 2.5) / 4))  # 1 / 2.5
    assert cfg.shift_factor == pytest.approx((0.5 - 0.3 + 1.0 + 0.2) / 4)  # 0.35
    assert cfg.latents_mean == pytest.approx([0.5, -0.3, 1.0, 0.2])
    assert cfg.latents_std == pytest.approx([2.0, 2.5, 3.0, 2.5])
    # latents with exactly these statistics: after (z - shift) * scale their std is about 1
    z = tok.latent_mean + tok.latent_std * torch.randn(4096, 8, 4, generator=gen(2))
    z_norm = (z - cfg.shift_factor) * cfg.scaling_factor
    # by hand: sqrt(mean of per-channel variances + variance of the channel means) / mean std
    expected = (((4 + 6.25 + 9 + 6.25) / 4 + ((0.15**2 + 0.65**2 + 0.65**2 + 0.15**2) / 4)) ** 0.5) / 2.5
    assert expected == pytest.approx(1.03, abs=0.01)
    assert z_norm.std().item() == pytest.approx(expected, rel=0.03)
    assert torch.allclose(z_norm / cfg.scaling_factor + cfg.shift_factor, z, atol=1e-5)  # the inverse
    # the shipped student: its stored statistics, and its latents of random images, near unit scale
    student = Tokenizer.from_pretrained("tiny-64-student")
    scfg = AutoencoderMSDD.from_tokenizer(student).config
    assert scfg.scaling_factor == pytest.approx(1 / (sum(student.latent_std.tolist()) / 8), rel=1e-6)
    assert scfg.shift_factor == pytest.approx(sum(student.latent_mean.tolist()) / 8, abs=1e-7)


@pytest.mark.parametrize("family", ["ssdd-spatial", "ssdd-tokens", "plain", "msdd"])
def test_every_family(family, tmp_path):
    if family.startswith("ssdd"):
        kind = family.split("-")[1]
        config = load_config("ssdd-tiny-test", [f"model.ssdd.latent_kind={kind}", "model.ssdd.steps=2",
                                                "model.ssdd.encoder_channels=[8,8,8,8]"]).model
    else:
        config = tiny_config(f"model.family={family}").model
    tok = Tokenizer(config).eval()
    tok.latent_std.fill_(2.0)
    vae = AutoencoderMSDD.from_tokenizer(tok)
    r = config.image_size
    x = torch.rand(2, 3, r, r, generator=gen(1)) * 2 - 1
    z = vae.encode(x).latent_dist.sample()
    want = (2, 4, r // 8, r // 8) if family == "ssdd-spatial" else (2, config.latent_tokens, config.latent_dim)
    assert z.shape == want
    assert len(vae.config.latents_std) == want[1 if family == "ssdd-spatial" else 2]
    assert vae.config.scaling_factor == pytest.approx(0.5)
    out = vae.decode(z, generator=gen(0)).sample
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, tok.decode(z, generator=gen(0)))
    vae.save_pretrained(tmp_path)
    assert torch.equal(AutoencoderMSDD.from_pretrained(tmp_path).decode(z, generator=gen(0)).sample, out)


def test_import_msdd_leaves_diffusers_out():
    code = "import msdd, msdd.integrations, sys; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.delitem(sys.modules, "msdd.integrations.diffusers")
    with pytest.raises(ImportError, match=r'pip install "msdd\[diffusers\]"'):
        importlib.import_module("msdd.integrations.diffusers")
