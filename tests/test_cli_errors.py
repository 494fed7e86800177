"""User errors that a new user's session found tracebacks or silent mistakes for: each is now exit code 2 with a
message naming the option, found before any work (no model loaded, nothing timed or trained)."""

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from msdd.cli import main
from msdd.hub import BUNDLED

from conftest import tiny_args
from test_faults import _make_unwritable


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    # an existing folder where a file is written: refused before the benchmark, not after it
    assert main(["bench", "--preset", "tiny-test", "--json", str(folder)]) == 2
    assert f"--json {folder} is an existing folder" in _error(capsys)
    assert main(["bench", "--preset", "tiny-test", "--json", str(afile / "x.json")]) == 2
    assert f"--json {afile / 'x.json'}: {afile} is a file" in _error(capsys)
    for flag in ("--out", "--plot"):  # before the decodes of every image
        assert main(["eval", "--model", "tiny-64", "--limit", "1", flag, str(folder)]) == 2
        assert f"{flag} {folder} is an existing folder" in _error(capsys)
    assert main(["export", "--model", "tiny-64", "--out", ""]) == 2
    assert "--out is empty" in _error(capsys)
    undo = _make_unwritable(folder)
    try:  # a folder the process cannot write in (root: an immutable one), for a folder and for a file argument
        assert main(["export", "--model", "tiny-64", "--out", str(folder / "copy")]) == 2
        assert f"--out {folder / 'copy'}: cannot write in {folder} (" in _error(capsys)
        assert main(["bench", "--preset", "tiny-test", "--json", str(folder / "b.json")]) == 2
        assert f"--json {folder / 'b.json'}: cannot write in {folder} (" in _error(capsys)
    finally:
        undo()
    assert list(folder.iterdir()) == []  # the checks leave nothing behind


@pytest.mark.parametrize("argv, flag", [
    (["train", "--run-dir", "r", "--minutes", "0"], "--minutes"),
    (["train", "--run-dir", "r", "--minutes", "nan"], "--minutes"),
    (["distill", "--teacher", "t", "--run-dir", "r", "--minutes", "-1"], "--minutes"),
    (["demo", "--minutes", "-5"], "--minutes"),
    (["fidelity", "--seeds", "0"], "--seeds"),
    (["fidelity", "--train-steps", "0"], "--train-steps"),
    (["reconstruct", "x.png", "--batch-size", "-2"], "--batch-size"),
    (["latent-stats", "--model", "m", "--max-images", "-5"], "--max-images"),
    (["eval", "--limit", "0"], "--limit"),
    (["train", "--run-dir", "r", "--limit", "0"], "--limit"),
    (["gen-train", "--tokenizer", "t", "--run-dir", "r", "--max-steps", "0"], "--max-steps"),
    (["generate", "--generator", "g", "--tokenizer", "t", "--batch-size", "0"], "--batch-size"),
])
def test_budgets_and_counts_must_be_positive(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}:" in _error(capsys)


@pytest.mark.parametrize("value", [".inf", "nan", "-.inf"])
def test_config_numbers_must_be_finite(tmp_path, value, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "1", *tiny_args(),
                 "--set", f"train.lr={value}"]) == 2
    assert "`train.lr`: expected a finite number" in _error(capsys)
    assert not (tmp_path / "r").exists()


def test_a_run_directory_of_the_other_stage_is_not_resumed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", *tiny_args()]) == 0
    capsys.readouterr()
    assert main(["distill", "--teacher", str(run / "model"), "--run-dir", str(run), "--max-steps", "1",
                 *tiny_args()]) == 2
    err = _error(capsys)
    assert "a checkpoint of another kind of run" in err and "'student'" in err and "choose a new --run-dir" in err


def test_a_weights_file_of_another_network_names_the_option(tmp_path):
    from msdd.models.perceptual import LPIPS

    path = tmp_path / "other.safetensors"
    save_file({"linear.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError,
                       match=r"--vgg-weights .*other.safetensors does not hold the weights of the LPIPS") as e:
        LPIPS(path)
    assert "vgg16-397923af.pth" in str(e.value) and len(str(e.value)) < 600  # not the state dict's key lists
    pytest.importorskip("timm")
    from msdd.models.discriminator import DinoDiscriminator
    from msdd.models.repa import DinoV2Features

    for network, option, expected in ((DinoDiscriminator, "--dino-weights", "dino_deitsmall16_pretrain.pth"),
                                      (DinoV2Features, "--dinov2-weights", "dinov2_vits14_pretrain.pth")):
        with pytest.raises(ValueError, match=rf"{option} .*other.safetensors does not hold the weights of") as e:
            network(path)
        assert expected in str(e.value) and len(str(e.value)) < 600


def test_push_checks_the_repo_id_and_the_evaluation_first(tmp_path, capsys):
    stage = tmp_path / "stage"
    assert main(["push", "tiny-64", "not a repo id!!", "--stage-only", str(stage)]) == 2
    assert "is not a Hub repo id" in _error(capsys)
    for content in ("[1, 2]", '{"metrics": 5}', '{"metrics": {"psnr": "high"}}', "{not json",
                    '{"metrics": {}, "protocol": 3}', '{"metrics": {}, "baselines": []}',
                    '{"metrics": {}, "baselines": {"pca": 27.9}}'):
        bad = tmp_path / "eval.json"
        bad.write_text(content)
        assert main(["push", "tiny-64", "me/tok", "--eval-json", str(bad), "--stage-only", str(stage)]) == 2
        assert f"--eval-json {bad}: not" in _error(capsys)
    assert not stage.exists()
    good = tmp_path / "good.json"  # a metric that was not measured (None) is a dash in the card
    good.write_text(json.dumps({"metrics": {"psnr": 27.5, "ssim": None}, "protocol": {}, "baselines": {}}))
    assert main(["push", "tiny-64", "me/tok", "--eval-json", str(good), "--stage-only", str(stage)]) == 0
    assert "| this model | 256 | 27.50 | - |" in (stage / "README.md").read_text()


def test_export_refuses_an_ignored_dtype_and_a_folder_that_holds_files(tmp_path, capsys):
    copy = tmp_path / "copy"
    assert main(["export", "--model", "tiny-64", "--out", str(copy), "--format", "diffusers", "--dtype", "fp16"]) == 2
    assert "--dtype applies to --format msdd only" in _error(capsys)
    assert not copy.exists()
    assert main(["export", "--model", "tiny-64", "--out", str(copy)]) == 0
    before = (copy / "model.safetensors").read_bytes()
    capsys.readouterr()
    for model, fmt in ((str(copy), "msdd"), ("tiny-64-teacher", "msdd"), ("tiny-64", "diffusers")):
        assert main(["export", "--model", model, "--out", str(copy), "--format", fmt]) == 2  # itself, or another
        assert f"--out {copy} already holds files (config.json, model.safetensors)" in _error(capsys)
    assert (copy / "model.safetensors").read_bytes() == before and len(list(copy.iterdir())) == 2
    bundled = BUNDLED["tiny-64-student"]  # a bundled name's own folder, which the name does not spell
    weights = (bundled / "model.safetensors").read_bytes()
    assert main(["export", "--model", "tiny-64-student", "--out", str(bundled), "--dtype", "bf16"]) == 2
    assert "already holds files" in _error(capsys) and (bundled / "model.safetensors").read_bytes() == weights
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--model", "tiny-64", "--out", str(empty), "--dtype", "fp32"]) == 0  # an empty one is new
    assert sorted(f.name for f in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_an_export_that_fails_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import msdd.hub

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(msdd.hub, "atomic_save_safetensors", full_disk)
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny-64", "--out", str(out)]) == 2
    assert "No space left on device" in _error(capsys)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary
    (tmp_path / ".out.tmp-999999999").mkdir()  # a killed export's temporary (no such process) is cleared
    monkeypatch.undo()
    assert main(["export", "--model", "tiny-64", "--out", str(out)]) == 0
    assert [f.name for f in tmp_path.iterdir()] == ["out"]


def test_fetch_weights_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert main(["fetch-weights", "vgg16"]) == 2
    err = _error(capsys)
    assert "could not download vgg16 from https://download.pytorch.org/models/vgg16-397923af.pth ([Errno -2] Name or " \
           "service not known); check the network, or fetch the file elsewhere and copy it to " in err  # the reason
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in err and "--vgg-weights" in err


def test_options_a_command_would_ignore_are_refused(capsys):
    assert main(["info", "--model", "tiny-64", "--set", "decoder.depth=1"]) == 2
    assert "drop --set" in _error(capsys)
    assert main(["bench", "--gen-preset", "bogus", "--pipeline"]) == 2
    assert "--gen-preset: unknown generator preset 'bogus'" in _error(capsys)
    assert main(["bench", "--ssdd-preset", "bogus"]) == 2
    assert "--ssdd-preset: unknown SSDD preset 'bogus'" in _error(capsys)
    assert main(["bench", "--preset", "ssdd-tiny-test", "--quick"]) == 2  # was: SSDD timed as the "student" row
    assert "--preset: 'ssdd-tiny-test' is a 'ssdd' model; the student and teacher rows time a multi-scale" in \
        _error(capsys)
    msdd_yaml = Path(__file__).parents[1] / "src" / "msdd" / "configs" / "tiny-test.yaml"
    assert main(["bench", "--ssdd-preset", str(msdd_yaml), "--quick"]) == 2  # was: refused after the peak probe
    assert f"--ssdd-preset: {msdd_yaml} is a 'msdd' model, not an SSDD one" in _error(capsys)


def test_errors_name_the_option_not_the_config_key(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny-test", "--resolution", "33", "--json", str(tmp_path / "b.json")]) == 2
    err = _error(capsys)  # was: invalid config value for `model.encoder.patch_size`
    assert err.startswith("error: --resolution 33 does not fit") and "e.g. 32 or 64" in err
    assert main(["eval", "--pca-source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e.json")]) == 2
    err = _error(capsys)  # was: data.source=..., after the model was loaded
    assert f"--pca-source={str(tmp_path / 'nowhere')!r} is neither" in err and "data.source" not in err


def test_warnings_are_one_line_on_the_command_line(tmp_path, photo_folder):
    (photo_folder / "broken.png").write_bytes(b"not an image")  # skipped with a warning, counted
    run = subprocess.run([sys.executable, "-m", "msdd.cli", "train", "--run-dir", str(tmp_path / "r"),
                          "--max-steps", "4", *tiny_args(), "--set", f"data.source={photo_folder}",
                          "--set", "train.batch_size=2"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "broken.png" in line]
    assert lines and all("warning: skipping image " in line for line in lines), run.stderr  # (after a progress bar)
    assert "UserWarning" not in run.stderr and "warnings.warn(" not in run.stderr


def test_weights_of_another_model_say_so_briefly(tmp_path, capsys):
    copy = tmp_path / "copy"
    assert main(["export", "--model", "tiny-64", "--out", str(copy), "--dtype", "fp32"]) == 0
    config = json.loads((copy / "config.json").read_text())
    config["model"]["decoder"]["depth"] = 6  # the weights hold 4 blocks
    (copy / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["info", "--model", str(copy)]) == 2
    err = _error(capsys)
    assert "does not match its config.json: tensors " in err and " missing (decoder.blocks." in err
    assert "The two files come from different models" in err and "unexpected" not in err and len(err) < 600


def test_options_that_cannot_both_apply(tmp_path, capsys):
    assert main(["fidelity", "--quick", "--seeds", "3", "--out", str(tmp_path / "f")]) == 2
    assert "--quick runs one seed per configuration" in _error(capsys)
    assert main(["reconstruct", "x.png", "--crop", "--tile-overlap", "8", "--out", str(tmp_path / "r")]) == 2
    assert "--crop reconstructs one centre crop per file without tiles" in _error(capsys)  # was: ignored
    assert main(["latent-stats", "--model", str(tmp_path / "nowhere")]) == 2
    assert f"--model {tmp_path / 'nowhere'} is not a model folder" in _error(capsys)
    with pytest.warns(UserWarning, match="--sweep-steps: .*tiny-64-student is a one-step student"):
        assert main(["eval", "--model", "tiny-64", "--limit", "2", "--pca-source", "none", "--sweep-steps", "1;2",
                     "--out", str(tmp_path / "e.json")]) == 0
    assert len(json.loads((tmp_path / "e.json").read_text())["metrics"]) > 0  # one result, not a list of sweeps


def test_distill_refuses_model_settings_its_teacher_would_replace(tmp_path, capsys):
    run = tmp_path / "d"
    assert main(["distill", "--teacher", "tiny-64-teacher", "--run-dir", str(run), "--max-steps", "1",
                 "--set", "decoder.depth=1"]) == 2  # before: a student of depth 4, without a word
    assert "the student has the architecture of its teacher (tiny-64-teacher), which differs" in _error(capsys)
    assert not run.exists()


def test_a_failed_run_leaves_no_empty_run_directory(tmp_path, capsys):
    run, kept = tmp_path / "new", tmp_path / "existing"
    kept.mkdir()
    for folder in (run, kept):  # the data source is checked after the trainer made the run directory
        assert main(["train", "--run-dir", str(folder), "--max-steps", "1", *tiny_args(),
                     "--set", f"data.source={tmp_path / 'nowhere'}"]) == 2
        assert "is neither 'embedded'" in _error(capsys)
    assert not run.exists() and kept.is_dir()  # a folder that was there before the command stays
    deep = kept / "runs" / "a" / "b"  # the parents it made go too (were: runs/a left behind)
    assert main(["train", "--run-dir", str(deep), "--max-steps", "1", *tiny_args(),
                 "--set", f"data.source={tmp_path / 'nowhere'}"]) == 2
    assert "is neither 'embedded'" in _error(capsys) and sorted(kept.iterdir()) == []
    assert main(["gen-train", "--run-dir", str(run), "--tokenizer", "tiny-64", "--max-steps", "1",
                 "--set", f"data.source={tmp_path / 'nowhere'}"]) == 2
    assert "is neither 'embedded'" in _error(capsys) and not run.exists()


def test_max_steps_below_the_runs_step_says_nothing_is_trained(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--run-dir", str(run), "--max-steps", "3", *tiny_args()]) == 0
    with pytest.warns(UserWarning, match="this run is already at step 3, past max_steps 2: nothing to train"):
        assert main(["train", "--run-dir", str(run), "--max-steps", "2", *tiny_args()]) == 0


def test_a_weights_file_for_a_loss_that_is_off_is_reported(tmp_path):
    # tiny-test trains without LPIPS and distils with a patch discriminator: the files would be ignored silently
    vgg, dino = tmp_path / "vgg16.pth", tmp_path / "dino.pth"
    with pytest.warns(UserWarning) as record:
        assert main(["train", "--run-dir", str(tmp_path / "t"), "--max-steps", "1", *tiny_args(),
                     "--vgg-weights", str(vgg), "--dinov2-weights", str(dino)]) == 0
        assert main(["distill", "--teacher", str(tmp_path / "t" / "model"), "--run-dir", str(tmp_path / "d"),
                     "--max-steps", "1", "--preset", "tiny-test", "--vgg-weights", str(vgg),
                     "--dino-weights", str(dino)]) == 0
    said = [str(w.message) for w in record if " is not used: " in str(w.message)]
    assert said == [f"--vgg-weights {vgg} is not used: model.flow.lpips_weight=0 (no LPIPS loss)",
                    f"--dinov2-weights {dino} is not used: the msdd family has no REPA loss",
                    f"--dino-weights {dino} is not used: distill.discriminator=patch",
                    f"--vgg-weights {vgg} is not used: distill.perceptual=none"]


def test_embedded_plus_a_folder_reports_the_photos_it_leaves_out(tmp_path, capsys):
    from PIL import Image

    from msdd.data import build_train_dataset, load_photo

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(load_photo("chelsea")[:120, :160])).save(folder / "good.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")  # was: taken as a training photo
    (folder / "broken.jpg").write_bytes(b"not an image")
    source = f"embedded+{folder}"
    assert build_train_dataset(source, 32, 0).photos[-1] == str(folder / "good.png")
    with pytest.warns(UserWarning, match="skipping image") as record:
        assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "2", *tiny_args(),
                     "--set", f"data.source={source}", "--set", "train.batch_size=4"]) == 0
    warned = sorted(str(w.message).split(":")[0] for w in record if "skipping image" in str(w.message))
    assert warned == [f"skipping image {folder / 'broken.jpg'}", f"skipping image {folder / 'tiny.png'}"]  # once each
    out = capsys.readouterr().out  # was: "data: no images skipped"
    assert "data: skipped 2 images, 2 distinct files" in out and "too small (8x8" in out


def test_no_image_to_fit_the_pca_on_says_why(tmp_path):
    import tarfile

    from msdd.eval.baselines import training_crops

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"every sample was skipped, e\.g\. .*a\.png: "):
        training_crops(str(broken), 32, 10, max_epochs=1)
    with tarfile.open(tmp_path / "empty-000000.tar", "w"):
        pass  # an empty shard: was the same bare "yielded no usable training image"
    with pytest.raises(ValueError, match="it holds no samples"):
        training_crops(str(tmp_path / "empty-000000.tar"), 32, 10, max_epochs=1)


def test_demo_and_fidelity_refuse_what_they_would_ignore_or_fail_on_later(tmp_path, capsys):
    from msdd.config import load_config, to_dict

    out = tmp_path / "demo"
    with pytest.warns(UserWarning, match="--set train.max_steps=5: not used, the demo sizes its own steps"):
        assert main(["demo", "--out", str(out), "--preset", "ssdd-tiny-test", "--set", "train.max_steps=5"]) == 2
    assert "of the 'ssdd' family; the demo trains and distils the multi-scale (msdd) family" in _error(capsys)
    (out / "stage1").mkdir(parents=True)  # an interrupted demo of another preset
    (out / "stage1" / "config.json").write_text(json.dumps(to_dict(load_config("tiny-test"))))
    assert main(["demo", "--out", str(out)]) == 2
    assert "holds a demo of tiny-test with other model or data settings than --preset tiny-64" in _error(capsys)
    assert sorted(p.name for p in out.rglob("*")) == ["config.json", "stage1"]  # nothing trained or written
    fid = tmp_path / "fid"
    assert main(["fidelity", "--quick", "--total-steps", "3", "--out", str(fid)]) == 2
    assert "--total-steps 3: the 4-stage teacher needs at least one step per stage" in _error(capsys)
    assert main(["fidelity", "--quick", "--ssdd-set", "model.family=msdd", "--out", str(fid)]) == 2
    assert "--ssdd-set: the fidelity table's ssdd rows need a model of the 'ssdd' family" in _error(capsys)
    assert not fid.exists()


def test_config_and_environment_errors_name_what_to_fix(tmp_path, monkeypatch, capsys):
    from msdd.dist import init_distributed

    assert main(["info", "--preset", "tiny-test", "--set", "model.sampling.steps=[20000,20000,20000,20000]"]) == 2
    assert "model.sampling.steps`: all must be in [1, 10,000]" in _error(capsys)  # a decode that would never end
    odd = tmp_path / "odd.yaml"
    odd.write_text("base: tiny-test\nmodel: {1: 2, foo: 3}\n")  # keys of two types
    assert main(["info", "--preset", str(odd)]) == 2
    assert "unknown config key(s) ['1', 'foo']" in _error(capsys)
    monkeypatch.setenv("SLURM_NTASKS", "2")  # a single-process command inside an salloc shell
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="2 processes asked for .* or for one process unset SLURM_NTASKS"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE='abc' is not a whole number"):
        init_distributed("cpu")


def test_a_seed_out_of_range_is_refused_with_the_range(tmp_path, capsys):
    never = tmp_path / "never-made"
    for command in (["eval", "--model", str(BUNDLED)], ["generate", "--model", str(BUNDLED), "--out", str(never)]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--seed", str(2**70)])
        assert e.value.code == 2
        assert f"--seed: {2**70} is out of range; give a whole number in [0, 2**63)" in _error(capsys)
    assert main(["train", "--preset", "tiny-test", "--run-dir", str(never), "--set", f"train.seed={2**63}"]) == 2
    assert "`train.seed`: must be in [0, 2**63)" in _error(capsys) and not never.exists()
    import argparse

    from msdd.cli.common import seed_arg

    assert [seed_arg(t) for t in ("0", str(2**63 - 1))] == [0, 2**63 - 1]  # both ends of the range
    for text in ("-1", str(2**63)):  # one past either end
        with pytest.raises(argparse.ArgumentTypeError, match=r"out of range; give a whole number in \[0, 2\*\*63\)"):
            seed_arg(text)


def test_large_seeds_seed_every_derived_generator():
    """Per-image and per-epoch seeds are seed * 1,000,003 + n modulo 2**64, which torch takes; below 2**64 the modulo
    changes nothing, so small seeds draw what they always drew."""
    from msdd.seeding import derived_seed, image_generators
    from msdd.train.stream import ResumableSampler

    big = 2**63 - 1
    assert derived_seed(big, 5) == (big * 1_000_003 + 5) % 2**64 and derived_seed(3, 5) == 3_000_014
    a, b = image_generators(big, [0, 1])
    assert torch.randn(4, generator=a).ne(torch.randn(4, generator=b)).all()
    small = torch.randn(4, generator=image_generators(3, [5])[0])
    assert torch.equal(small, torch.randn(4, generator=torch.Generator().manual_seed(3_000_014)))
    assert sorted(ResumableSampler(9, big, batch=3).order()) == list(range(9))


def test_distill_names_the_stage_1_settings_it_ignores(tmp_path, capsys):
    with pytest.warns(UserWarning) as record:  # the run then stops at the missing teacher, before any work
        assert main(["distill", "--teacher", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "d"),
                     "--set", "train.max_steps=3", "--set", "train.pca_crops=5", "--set", "train.seed=4",
                     "--set", "train.keep_checkpoints=1", "--set", "distill.cfg=3"]) == 2
    said = [str(w.message) for w in record if "does not read" in str(w.message)]
    assert said == ["--set train.max_steps (set distill.max_steps instead), train.pca_crops (drop it): stage 1's "
                    "settings, which a distillation does not read (ignored). The train fields a distillation reads: "
                    "train.seed, train.bf16, train.betas, train.grad_clip, train.linear_lr_scale, train.min_lr_ratio, "
                    "train.keep_checkpoints"]
    assert str(tmp_path / "nowhere") in _error(capsys)
    from msdd.config import load_config, to_dict

    ssdd = tmp_path / "ssdd-teacher"  # the family is read from its config; then the damaged weights stop the run
    ssdd.mkdir()
    (ssdd / "model.safetensors").write_bytes(b"not weights")
    (ssdd / "config.json").write_text(json.dumps({"format": "msdd-tokenizer", "format_version": 1,
                                                  "model": to_dict(load_config("ssdd-tiny-test").model)}))
    with pytest.warns(UserWarning) as record:
        assert main(["distill", "--teacher", str(ssdd), "--run-dir", str(tmp_path / "d"), "--preset", "ssdd-tiny-test",
                     "--set", "distill.cfg=3", "--set", "distill.teacher_steps=4", "--set", "distill.lr=1e-3"]) == 2
    said = [str(w.message) for w in record if "does not read" in str(w.message)]
    assert said == ["--set distill.cfg, distill.teacher_steps: settings of the multi-scale distiller's discriminator "
                    "and guidance, which an SSDD teacher's GAN-free distillation does not read (ignored); its teacher "
                    "decodes with its own model.ssdd.steps"]


def test_a_missing_extra_is_one_line_and_other_import_errors_stay_tracebacks(monkeypatch, capsys):
    import msdd.cli.training as training

    def needs_extra(args):  # as TarShardDataset, the REPA loss and the DINO discriminator raise it
        raise ImportError("tar shards need the webdataset package: pip install 'msdd[webdataset]'")

    monkeypatch.setattr(training, "cmd_train", needs_extra)
    assert main(["train", "--run-dir", "never-made"]) == 2  # was: a traceback, exit 1
    assert _error(capsys) == "error: tar shards need the webdataset package: pip install 'msdd[webdataset]'\n"

    def broken(args):
        raise ImportError("cannot import name 'x' from 'msdd.y'")  # a bug or a broken install: not hidden

    monkeypatch.setattr(training, "cmd_train", broken)
    with pytest.raises(ImportError, match="cannot import name"):
        main(["train", "--run-dir", "never-made"])


def test_a_pca_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    from msdd.eval.baselines import pca_for_source

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MSDD_CACHE", str(blocker / "msdd"))  # under a file: no folder can be made there
    with pytest.warns(UserWarning, match=f"the PCA baseline's fit was not cached \\({blocker / 'msdd'}: .*MSDD_CACHE"):
        pca = pca_for_source("embedded", 32, 8, crops=64)  # was: an OSError after the fit, and no results
    assert pca.components.shape == (8, 3 * 32 * 32)


def test_version_and_python_dash_m(capsys):
    import msdd

    with pytest.raises(SystemExit) as e:  # was: "the following arguments are required: command"
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"msdd {msdd.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "msdd", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"msdd {msdd.__version__}\n", r.stderr  # was: no msdd.__main__


def test_a_finished_training_prints_its_summary_and_an_interrupted_one_exits_128_plus_the_signal(tmp_path, capsys):
    """`finish_training` (the end of `msdd train`, `distill` and `gen-train`): the summary as JSON with its "last"
    record at the end, then where the model went, exit 0; interrupted, no "written to" and 128 + the signal (the
    code a scheduler reads as "stopped by SIGTERM"), 1 for a stop that is not a signal. The trainer is a stand-in
    with the two attributes the function reads (the end of real runs is tested in tests/test_robust.py, slow)."""
    import json
    import signal
    from types import SimpleNamespace

    from msdd.cli.common import finish_training

    trainer = SimpleNamespace(dist=SimpleNamespace(is_main=True), run_dir=tmp_path)
    summary = {"last": {"loss": 0.5}, "steps": 3, "interrupted": None}
    assert finish_training(trainer, summary, "one-step student") == 0
    out = capsys.readouterr().out
    shown, written = out.rsplit("\n", 2)[:2]
    assert list(json.loads(shown)) == ["steps", "interrupted", "last"] and json.loads(shown)["last"] == {"loss": 0.5}
    assert written == f"one-step student written to {tmp_path / 'model'}"
    for stop, code in (("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", 128 + signal.SIGINT), ("time budget", 1)):
        assert finish_training(trainer, {**summary, "interrupted": stop}, "model") == code, stop
        assert "written to" not in capsys.readouterr().out
