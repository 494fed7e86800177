"""User errors that no test reached before (a coverage run's never-executed raises): each bad option, file or data
source is exit code 2 with a one-line message that names it and the fix, and no traceback."""

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from msdd.cli import main
from msdd.data import load_photo
from msdd.generator import build_generator
from msdd.generator.files import save_generator
from msdd.tokenizer import Tokenizer

from conftest import TINY_PRESET, tiny_args, tiny_config
from test_cli_errors import _error
from test_generator import TINY_GEN


def _photos(folder, n: int, size: int = 80):
    """n crops of the embedded coffee photo, size x size px, as PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        crop = np.ascontiguousarray(load_photo("coffee")[i * 50 : i * 50 + size, :size])
        Image.fromarray(crop).save(folder / f"p{i}.png")
    return folder


@pytest.fixture
def small_images(tmp_path):
    """A folder of three 8 x 8 px images: too small for every model and data source."""
    return _photos(tmp_path / "small", 3, size=8)


@pytest.fixture
def tiny_tokenizer(tmp_path):
    """A random-weight 32 px tokenizer (tiny_config) saved as a model directory."""
    Tokenizer(tiny_config().model).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.fixture
def tiny_generator(tmp_path):
    """A random-weight generator over tiny_tokenizer's (8, 4) latents."""
    return save_generator(build_generator(TINY_GEN, (8, 4)), tmp_path / "gen")


# ---------------------------------------------------------------------------------------------
# options refused by argparse or before any work


@pytest.mark.parametrize("argv, flag, says", [
    (["train", "--run-dir", "r", "--minutes", "abc"], "--minutes", "'abc' is not a number"),
    (["reconstruct", "x.png", "--seed", "abc"], "--seed", "'abc' is not a whole number"),
    (["eval", "--limit", "x"], "--limit", "'x' is not a whole number"),
    (["generate", "--generator", "g", "--tokenizer", "t", "--out", "o", "--class-label", "x"], "--class-label",
     "'x' is not a class index (an int)"),
])
def test_argument_types_name_the_option(argv, flag, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}: {says}" in _error(capsys)


@pytest.mark.parametrize("argv, says", [
    (["bench", "--json", ""], ["--json is empty; pass a file path"]),
    (["reconstruct", "x.png", "--workers", "-1", "--out", "{tmp}/o"], ["--workers must be >= 0, got -1"]),
    (["info", "--step-time", "-1"], ["--step-time takes a number of rounds >= 1, got -1"]),
    (["bench", "--resolutions", "64,abc", "--json", "{tmp}/b.json"],
     ["--resolutions '64,abc': expected a comma list of ints"]),
    (["bench", "--contenders", ",", "--json", "{tmp}/b.json"], ["--contenders ',': expected at least one value"]),
    (["bench", "--quick", "--resolutions", "1", "--json", "{tmp}/b.json"],
     ["--resolutions: 1 px would leave -2 stages for this 4-stage 64 px model", "give 8 px or more"]),
    (["fidelity", "--quick", "--preset", TINY_PRESET, "--out", "{tmp}/f"],
     ["not of 'tiny-test'", "leave out --preset, or drop --quick"]),
])
def test_options_refused_before_any_work(argv, says, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = _error(capsys)
    assert all(s in err for s in says), err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("override, says", [
    ("model=3", ["`model`: expected a mapping, got 3"]),
    ("model.sampling.steps=3", ["`model.sampling.steps`: expected a list, got 3"]),
    ("name=3", ["`name`: expected a string, got 3"]),
    ("model.flow.lpips_weight.x=1", ["invalid override `model.flow.lpips_weight.x`: `lpips_weight` is not a section"]),
    ("train.lr=[1", ["invalid override 'train.lr=[1': value is not valid YAML (",
                     "write KEY=VALUE with a YAML value, e.g. model.decoder.depth=4"]),
])
def test_set_values_name_the_field(override, says, capsys):
    assert main(["info", "--set", override]) == 2
    err = _error(capsys)
    assert all(s in err for s in says), err
    assert len(err.strip().splitlines()) == 1  # one line (YAML's own message spans several)


def test_preset_files(tmp_path, capsys):
    from msdd.config import Config, load_config

    assert main(["info", "--preset", str(tmp_path / "missing.yaml")]) == 2
    assert f"--preset {tmp_path / 'missing.yaml'}: cannot read it (No such file or directory)" in _error(capsys)
    (tmp_path / "base.yaml").write_text("base: 3\n")
    assert main(["info", "--preset", str(tmp_path / "base.yaml")]) == 2
    assert "`base: 3` must name a preset (such as tiny-64)" in _error(capsys)
    (tmp_path / "empty.yaml").write_text("")  # an empty file: every field at its default
    assert load_config(str(tmp_path / "empty.yaml")) == Config(name=str(tmp_path / "empty.yaml"))


# ---------------------------------------------------------------------------------------------
# data sources of `msdd train`


@pytest.mark.parametrize("override, says", [
    ("data.source=embedded+{small}", ["data.source=embedded+{small}: no usable photograph in {small}, e.g. ",
                                      "too small (8x8"]),
    ("data.eval_source={tmp}/val-{{0..1}}.tar", ["data.eval_source='{tmp}/val-{{0..1}}.tar': evaluation images come "
                                                 "from 'embedded' or a folder, not tar shards"]),
    ("data.eval_source={small}", ["none of the 3 images in {small} is usable, e.g. ", "too small (8x8"]),
    ("data.source={few}", ["the training set has 3 images, fewer than one global batch of 8; lower the batch size "
                           "or add images"]),
])
@pytest.mark.filterwarnings("ignore:skipping image")
def test_unusable_training_data_is_named(override, says, tmp_path, small_images, capsys):
    names = {"small": small_images, "tmp": tmp_path, "few": _photos(tmp_path / "few", 3, size=64)}
    run = tmp_path / "runs" / "a"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1",
                 *tiny_args(override.format(**names))]) == 2
    err = _error(capsys)
    assert all(s.format(**names) in err for s in says), err
    assert not (tmp_path / "runs").exists()  # the run folders it made, removed again


def test_tar_shards_without_one_full_batch(tmp_path, capsys):
    """Two images in the only shard, a batch of 8: an error, not an endless loop; the run folder keeps what was
    written into it (its config), the folder above it too."""
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(2):
            png = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(load_photo("coffee")[i * 50 : i * 50 + 64, :64])).save(png, "PNG")
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    run = tmp_path / "runs" / "a"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1",
                 *tiny_args(f"data.source={tmp_path}/shard-0.tar", "model.linear_path=false")]) == 2
    assert "the training data gives this process not one full batch of 8 per epoch; add data or lower the batch " \
           "size" in _error(capsys)
    assert (run / "config.json").is_file()


def test_a_missing_file_named_by_an_environment_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSDD_VGG16_WEIGHTS", str(tmp_path / "vgg.pth"))
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "1",
                 *tiny_args("model.flow.lpips_weight=0.1")]) == 2
    err = _error(capsys)
    assert f"$MSDD_VGG16_WEIGHTS={tmp_path / 'vgg.pth'}: no such file (expected vgg16-397923af.pth" in err
    assert "model.flow.lpips_weight=0.1; set it to 0 to train without LPIPS" in err


def test_data_sources_checked_by_the_api(tmp_path):
    from msdd.data import TarShardDataset
    from msdd.train.stream import ResumableSampler

    with pytest.raises(ValueError, match=r"unknown embedded photo 'nope'; choose from \('coffee', "):
        load_photo("nope")
    (tmp_path / "only-0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="has 1 shard.s., fewer than the 2 processes; .* write more, smaller shards"):
        TarShardDataset(str(tmp_path / "only-0.tar"), 32, world_size=2)
    with pytest.raises(ValueError, match="a global batch of 4 cannot be split evenly over 3 processes; make the batch "
                                         "size a multiple of the number of processes"):
        ResumableSampler(10, seed=0, world_size=3, batch=4)


# ---------------------------------------------------------------------------------------------
# `msdd reconstruct` and `msdd latent-stats`


def test_reconstruct_inputs(tmp_path, small_images, capsys):
    assert main(["reconstruct", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")]) == 2
    assert f"error: input {tmp_path / 'nope.png'} does not exist" in _error(capsys)
    own = tmp_path / "own"  # an earlier run's outputs only: not read as inputs
    _photos(own / "reconstructions", 1, size=64)
    assert main(["reconstruct", str(own), "--out", str(own)]) == 2
    err = _error(capsys)
    assert f"no image to reconstruct in ['{own}']" in err and "pass the original images, or another --out" in err
    with pytest.warns(UserWarning, match="8x8 px is smaller than the model resolution 64"):  # the warnings above
        assert main(["reconstruct", str(small_images), "--crop", "--out", str(tmp_path / "o")]) == 2
    assert "no usable image among 3 files (3 skipped); the warnings above say why" in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_reconstruct_files_refuses_an_unknown_size(tmp_path):
    from msdd.eval.reconstruct_files import reconstruct_files

    tok = Tokenizer(tiny_config().model)
    with pytest.raises(ValueError, match=r"size must be one of \('auto', 'keep', 'crop'\), got 'big'"):
        reconstruct_files(tok, [], [], [], tmp_path / "o", size="big")


def test_latent_stats_of_unusable_images(tmp_path, small_images, capsys):
    assert main(["latent-stats", "--model", "tiny-64", "--out", str(tmp_path / "m"), "--data",
                 str(small_images)]) == 2
    err = _error(capsys)
    assert f"no usable images to compute latent statistics from (3 skipped, e.g. {small_images / 'p0.png'}: too " \
           "small" in err
    assert "give data with usable images (`msdd latent-stats --data`" in err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# model directories


def test_model_paths(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    import msdd.hub

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["info", "--model", str(afile)]) == 2
    assert f"{afile} is a file; pass the model directory that holds config.json and model.safetensors" in \
        _error(capsys)
    meta = json.loads((tiny_tokenizer / "config.json").read_text())
    (tiny_tokenizer / "config.json").write_text(json.dumps({**meta, "format_version": 0}))
    assert main(["info", "--model", str(tiny_tokenizer)]) == 2
    err = _error(capsys)
    assert f"{tiny_tokenizer / 'config.json'}: format_version must be an int >= 1, got 0" in err
    assert "save the model again with `Tokenizer.save_pretrained`" in err
    monkeypatch.setitem(msdd.hub.BUNDLED, "tiny-64", tmp_path / "uninstalled" / "tiny-64")
    assert main(["info", "--model", "tiny-64"]) == 2
    assert "the bundled model tiny-64 is not installed; pass a model directory" in _error(capsys)


def test_bench_models_of_another_family_or_size(tmp_path, tiny_tokenizer, capsys):
    from msdd.config import load_config

    Tokenizer(load_config("ssdd-tiny-test").model).save_pretrained(tmp_path / "ssdd")
    bench = ["bench", "--quick", "--json", str(tmp_path / "b.json")]
    for flag in ("--model", "--student"):
        assert main([*bench, flag, str(tmp_path / "ssdd")]) == 2
        assert f"{tmp_path / 'ssdd'} is a 'ssdd' model; --model / --student take multi-scale (msdd) models" in \
            _error(capsys)
    assert main([*bench, "--student", str(tiny_tokenizer)]) == 2  # 32 px against tiny-64's 64 px
    assert "--student is a 32 px model but the teacher is 64 px; both must decode the same resolution" in \
        _error(capsys)
    assert not (tmp_path / "b.json").exists()


def test_bench_parts_checked_by_the_api():
    from msdd.eval.bench import BenchSettings
    from msdd.eval.bench.contenders import ssdd_config
    from msdd.eval.bench.sdvae import sd_vae_contender

    with pytest.raises(ValueError, match="--ssdd-preset 'tiny-64' is a 'msdd' model, not an SSDD one"):
        ssdd_config("tiny-64", 64)
    row = sd_vae_contender(36, 1, torch.device("cpu"))
    assert row.decode is None and row.error == "resolution 36 is not a multiple of 8"
    command = BenchSettings(resolution=32, ssdd_preset="ssdd-tiny-64", compile=True).command()
    assert "--resolution 32" in command and "--ssdd-preset ssdd-tiny-64" in command and "--compile" in command


def test_distill_resume_from_another_teacher(tmp_path, capsys):
    from msdd.config import load_config
    from msdd.train.distill import build_distiller

    teachers = []
    for seed in (0, 1):  # two teachers of the same architecture, other weights
        torch.manual_seed(seed)
        Tokenizer(tiny_config().model).save_pretrained(tmp_path / f"t{seed}")
        teachers.append(tmp_path / f"t{seed}")
    settings = ["model.flow.num_stages=3", "model.sampling.steps=[2,2,2]", "distill.batch_size=2",
                "distill.ckpt_every=1", "distill.grid_every=1000"]  # tiny_config's model, a checkpoint every step
    build_distiller(load_config(TINY_PRESET, settings), teachers[0], tmp_path / "d").fit(max_steps=1, progress=False)
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teachers[1]), "--run-dir", str(tmp_path / "d"), "--max-steps", "2",
                 "--preset", TINY_PRESET, *[a for o in settings for a in ("--set", o)]]) == 2
    err = _error(capsys)
    assert f"cannot resume {tmp_path / 'd'}: it was distilled from a different teacher" in err
    assert "pass the teacher it started from, or start a new run directory" in err


# ---------------------------------------------------------------------------------------------
# `msdd gen-train` and `msdd generate`


@pytest.mark.parametrize("overrides, says", [
    (["data.source={photos}", "generator.num_classes=2"],
     ["generator.num_classes=2 reads class labels from subfolders, but {photos} has images outside any subfolder",
      "or set generator.num_classes=0"]),
    (["data.source={tmp}/train.tar"], ["data.source='{tmp}/train.tar': gen-train encodes 'embedded', "
                                       "'embedded+FOLDER' or a folder of images, not tar shards"]),
    (["generator.num_classes=2"], ["generator.num_classes=2: the embedded photos have no classes; set data.source to "
                                   "a folder with one subfolder per class, or generator.num_classes=0"]),
    (["data.source={small}"], ["data.source={small}: not one usable image to encode (skipped 3 images", "too small"]),
])
@pytest.mark.filterwarnings("ignore:skipping image")
def test_gen_train_data(overrides, says, tmp_path, small_images, tiny_tokenizer, capsys):
    names = {"photos": _photos(tmp_path / "photos", 2), "tmp": tmp_path, "small": small_images}
    run = tmp_path / "run"
    argv = ["gen-train", "--tokenizer", str(tiny_tokenizer), "--run-dir", str(run), "--max-steps", "1"]
    assert main([*argv, *[a for o in overrides for a in ("--set", o.format(**names))]]) == 2
    err = _error(capsys)
    assert all(s.format(**names) in err for s in says), err
    assert not run.exists()


def test_generator_presets_and_latent_shapes():
    from msdd.generator import load_gen_config
    from msdd.generator.model import LatentDiT

    with pytest.raises(ValueError, match=r"--preset 'nope': unknown generator preset; choose from \['gen-tiny', "):
        load_gen_config("nope")
    for shape in ((8,), (2, 4, 4, 4)):
        with pytest.raises(ValueError, match=r"a latent shape is \(tokens, channels\) or \(channels, height, width\)"):
            LatentDiT(TINY_GEN, shape)


@pytest.mark.parametrize("cfg", ["nan", "-1"])
def test_generate_guidance_must_be_a_finite_number(cfg, tmp_path, tiny_generator, tiny_tokenizer, capsys):
    assert main(["generate", "--generator", str(tiny_generator), "--tokenizer", str(tiny_tokenizer), "--out",
                 str(tmp_path / "o"), "--cfg", cfg]) == 2
    assert "guidance (--cfg) must be a finite number >= 0 (1: no guidance), got " in _error(capsys)


@pytest.mark.parametrize("edit, says", [
    (lambda meta: "{", "is not valid JSON (Expecting property name"),
    (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "latent_shape"}),
     "latent_shape must be [tokens, channels] or [channels, height, width] (ints >= 1), got None"),
    (lambda meta: json.dumps({**meta, "latent_shape": "ab"}), "latent_shape must be [tokens, channels] or"),
    (lambda meta: json.dumps({**meta, "latent_shape": [256]}), "got [256]"),
    (lambda meta: json.dumps({**meta, "latent_shape": [0, 4]}), "got [0, 4]"),
    (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "generator"}),
     "has no \"generator\" section (the network's settings) or it is not an object"),
])
def test_generate_refuses_a_damaged_generator_config(edit, says, tmp_path, tiny_generator, tiny_tokenizer, capsys):
    config = tiny_generator / "config.json"
    config.write_text(edit(json.loads(config.read_text())))
    assert main(["generate", "--generator", str(tiny_generator), "--tokenizer", str(tiny_tokenizer), "--out",
                 str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert f"{config}" in err and says in err
    assert "pass the <run>/model folder that `msdd gen-train` writes" in err


@pytest.mark.parametrize("usable, says", [
    (3, "--metrics needs at least 4 usable images, found 3"),
    (0, "no usable image to compare the samples with"),
])
def test_generate_metrics_need_data_images(usable, says, tmp_path, tiny_generator, tiny_tokenizer, small_images,
                                           capsys):
    data = _photos(tmp_path / "data", usable) if usable else small_images
    assert main(["generate", "--generator", str(tiny_generator), "--tokenizer", str(tiny_tokenizer), "--n", "2",
                 "--steps", "1", "--out", str(tmp_path / "o"), "--metrics", "--data", str(data)]) == 2
    assert f"--data {data}: {says}" in _error(capsys)
    assert not (tmp_path / "o" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# `msdd push` (the Hub API replaced: no network)


@pytest.mark.parametrize("fail", [False, True])
def test_push_uploads_the_staged_model_or_says_why_not(fail, tmp_path, tiny_tokenizer, monkeypatch, capsys):
    import huggingface_hub
    import huggingface_hub.constants

    uploaded = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            assert exist_ok

        def upload_folder(self, repo_id, folder_path, commit_message):
            if fail:
                raise ConnectionError("network is unreachable")
            uploaded.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return SimpleNamespace(commit_url="https://huggingface.co/me/tiny/commit/abc")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    rc = main(["push", str(tiny_tokenizer), "me/tiny"])
    if fail:
        assert rc == 2
        err = _error(capsys)
        assert "upload to the Hub repo 'me/tiny' failed (ConnectionError: network is unreachable)" in err
        assert "check the network and log in with `hf auth login`" in err
    else:
        assert rc == 0
        assert uploaded == [("me/tiny", ["README.md", "config.json", "model.safetensors"])]
        assert capsys.readouterr().out == \
            f"pushed {tiny_tokenizer} to me/tiny: https://huggingface.co/me/tiny/commit/abc\n"
