"""Faults that used to pass silently or late (issue 14): every checkpoint damaged, an unwritable run
directory, finite losses with non-finite gradients, a training folder with no usable image, PIL images
converted unlike files, path typos sent to the Hub, a NaN cfg or latent, config values that cannot run,
an evaluation without images; reconstructions whose names collide, latent statistics written over the
model in fp32, distillation resumed with changed train fields, damaged model folders and bad arguments.

Real files and real training runs with the tiny config; nothing under test is mocked (a gradient
hook stands in for a layer whose backward overflows; the Hub download is replaced so that no test
reaches the network).
"""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from msdd.cli import main
from msdd.data import ImageFolderDataset, collate_skip_bad, load_photo
from msdd.hub import file_sha256
from msdd.train.checkpoint import (
    CheckpointError, check_writable, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
    verify_checkpoint,
)  # fmt: skip
from msdd.train.stream import BatchStream, ResumableSampler
from msdd.train.stage1 import Stage1Trainer

from conftest import tiny_args, tiny_config

SMALL = ["train.batch_size=4", "data.limit=16"]


def _cli_train(run_dir, steps, *extra) -> int:
    return main(["train", "--run-dir", str(run_dir), *tiny_args(*SMALL, *extra), "--max-steps", str(steps)])


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


# ---------------------------------------------------------------- 1: every checkpoint damaged


def test_all_checkpoints_damaged_stops_instead_of_starting_over(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli_train(run, 10, "train.ckpt_every=2") == 0
    ckpts = list_checkpoints(run)
    assert len(ckpts) >= 3
    for c in ckpts:
        _truncate(c / "model.safetensors", 1000)
    before = {p: file_sha256(p) for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()

    assert _cli_train(run, 2, "train.ckpt_every=2") == 2  # before: warned, trained from step 0, exit 0
    err = capsys.readouterr().err
    assert f"every checkpoint in {run / 'checkpoints'} is damaged" in err
    for c in ckpts:
        assert re.search(rf"{c.name}: model\.safetensors has 1000 bytes, expected \d+", err)
    assert "move or delete" in err and "--run-dir" in err
    # nothing was touched: no new checkpoint, no rotation, the finished model and the log are as they were
    assert list_checkpoints(run) == ckpts
    assert {p: file_sha256(p) for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_rotation_never_deletes_the_intact_checkpoint_for_damaged_ones(tmp_path):
    weights = {"model": {"w": torch.arange(1000.0)}}
    for step in (6, 8, 10):
        save_checkpoint(tmp_path, step, weights, {"step": step}, "{}", keep=3)
    for step in (8, 10):
        _truncate(tmp_path / f"checkpoints/step_{step:08d}/model.safetensors", 1000)
    # resumed from step 6 (the newer two are damaged); with keep=1 its next save used to delete step 6 and
    # itself and keep only the damaged step 10
    with pytest.warns(UserWarning, match=r"deleting damaged checkpoint .*step_00000010 \(model\.safetensors has 1000"):
        save_checkpoint(tmp_path, 8, weights, {"step": 8}, "{}", keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000008"]
    assert verify_checkpoint(latest_checkpoint(tmp_path)) is None

    # every other checkpoint damaged (and newer), as in a run restarted from step 0 over them: its first
    # save used to be the one deleted, keeping the K=3 damaged ones
    other = tmp_path / "other"
    for step in (6, 8, 10):
        save_checkpoint(other, step, weights, {"step": step}, "{}", keep=3)
    for step in (6, 8, 10):
        _truncate(other / f"checkpoints/step_{step:08d}/model.safetensors", 1000)
    with pytest.warns(UserWarning, match="deleting damaged checkpoint"):
        save_checkpoint(other, 2, weights, {"step": 2}, "{}", keep=3)
    assert [p.name for p in list_checkpoints(other)] == ["step_00000002"]
    assert latest_checkpoint(other).name == "step_00000002"


def test_a_checkpoint_is_what_its_manifest_lists(tmp_path):
    weights = {"model": {"w": torch.arange(1000.0)}}
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, weights, {"step": step}, "{}", keep=3)
    step2, step4, step6 = list_checkpoints(tmp_path)
    # a file put into a checkpoint is not loaded as weights (was: a SafetensorError traceback on resume)
    (step6 / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert verify_checkpoint(step6) is None and sorted(load_checkpoint(step6)[0]) == ["model"]
    # a manifest of another structure, or one that lists nothing to check, makes the checkpoint damaged (was: a
    # TypeError traceback for a list; an empty table passed every check)
    (step6 / "manifest.json").write_text("[1, 2]")
    (step4 / "manifest.json").write_text('{"step": 4, "files": {}}')
    assert verify_checkpoint(step6).startswith("unreadable manifest (no {name: {size, sha256}} table")
    assert "not the state, config and weights of a checkpoint" in verify_checkpoint(step4)
    with pytest.warns(UserWarning, match=r"step_0000000[46] is damaged") as record:
        assert latest_checkpoint(tmp_path) == step2
    assert len(record) == 2


def test_a_new_nested_run_directory_is_made_and_only_step_folders_are_checkpoints(tmp_path):
    """`--run-dir runs/a/b` whose parents do not exist yet is made (with no checkpoints folder before the first
    save); the checkpoints are the step folders only: not a temporary folder left by a process killed while saving,
    nor other files or folders put there."""
    run = tmp_path / "runs" / "a" / "b"
    check_writable(run)
    assert run.is_dir() and list(run.iterdir()) == []
    save_checkpoint(run, 3, {"model": {"w": torch.zeros(2)}}, {"step": 3}, "{}")
    root = run / "checkpoints"
    (root / ".step_00000004.tmp-99").mkdir()
    (root / "step_notes.txt").write_text("notes")
    (root / "old").mkdir()
    check_writable(run)  # probes the checkpoints folder too, and leaves nothing behind
    assert sorted(p.name for p in root.iterdir()) == [".step_00000004.tmp-99", "old", "step_00000003", "step_notes.txt"]
    assert list_checkpoints(run) == [root / "step_00000003"] and latest_checkpoint(run) == root / "step_00000003"


def test_a_checkpoint_that_cannot_be_written_is_an_error_and_leaves_the_others(tmp_path):
    import resource
    import signal

    small, large = {"model": {"w": torch.arange(100.0)}}, {"model": {"w": torch.arange(100_000.0)}}
    save_checkpoint(tmp_path, 2, small, {"step": 2}, "{}")
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))  # files over 100 kB fail, as on a full disk
    try:  # was: a SafetensorError traceback, and the partial checkpoint left behind
        with pytest.raises(CheckpointError, match=r"cannot write the checkpoint of step 4 in .*checkpoints \(cannot "
                                                  r"write .*model\.safetensors: .*run the same command again"):
            save_checkpoint(tmp_path, 4, large, {"step": 4}, "{}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    assert latest_checkpoint(tmp_path).name == "step_00000002"


# ---------------------------------------------------------------- 3: unwritable run directory


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def _make_unwritable(folder: Path):
    """No new entries in `folder` (existing files stay writable, as in a read-only-mode directory); returns
    the undo. Root ignores permissions, so there the folder is made immutable (chattr +i) instead."""
    folder.chmod(0o555)
    if not _can_create(folder):
        return lambda: folder.chmod(0o755)
    folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode or _can_create(folder):
        pytest.skip("cannot make a folder unwritable here (root without chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_unwritable_run_directory_stops_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # writable, so the old code trained until its first checkpoint
    undo = _make_unwritable(run)
    try:
        with pytest.raises(CheckpointError, match=rf"cannot write to the run directory {re.escape(str(run))} "):
            Stage1Trainer(tiny_config(*SMALL), run)
        assert _cli_train(run, 2) == 2  # the command checks --run-dir before it builds anything
        assert f"error: --run-dir {run}: cannot write in {run} (" in capsys.readouterr().err
        parent = tmp_path / "ro"
        parent.mkdir()
        undo_parent = _make_unwritable(parent)
        try:  # a run directory that cannot even be created: the same error, not an OSError traceback
            with pytest.raises(CheckpointError, match=re.escape(str(parent / "new"))):
                Stage1Trainer(tiny_config(*SMALL), parent / "new")
            assert _cli_train(parent / "new", 2) == 2
            assert f"error: --run-dir {parent / 'new'}: cannot write in {parent} (" in capsys.readouterr().err
            assert not (parent / "new").exists()
        finally:
            undo_parent()
    finally:
        undo()
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # no probe left behind


# ---------------------------------------------------------------- 4: non-finite gradients


def _poison_first_grads(param: torch.nn.Parameter, n: int) -> None:
    """The first `n` backward passes give `param` an inf gradient while the loss stays finite."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return torch.full_like(grad, float("inf")) if calls[0] <= n else grad

    param.register_hook(hook)


def test_non_finite_gradients_with_a_finite_loss_are_skipped(tmp_path):
    trainer = Stage1Trainer(tiny_config(*SMALL, "train.log_every=1"), tmp_path / "r")
    _poison_first_grads(trainer.tok.encoder.patch_embed.weight, 3)
    before = {k: v.clone() for k, v in trainer.tok.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert trainer.train_step(images) is None  # nothing changed: weights, EMA, optimiser state
    assert all(torch.equal(before[k], v) for k, v in trainer.tok.state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.module.state_dict().items())
    assert not trainer.opt.state and trainer.ema.updates == 0

    with pytest.warns(UserWarning, match=r"non-finite gradients at step 0: step skipped \(2 in a row"):
        summary = trainer.fit(max_steps=3, progress=False)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in trainer.tok.state_dict().values())
    assert all(torch.isfinite(v).all() for v in trainer.ema.module.state_dict().values())
    assert np.isfinite(summary["last"]["loss"]) and np.isfinite(summary["last"]["grad_norm"])


def test_too_many_bad_steps_name_the_real_newest_checkpoint(tmp_path):
    fresh = Stage1Trainer(tiny_config(*SMALL), tmp_path / "fresh")
    _poison_first_grads(fresh.tok.encoder.patch_embed.weight, 10_000)
    with pytest.warns(UserWarning, match="non-finite gradients"), pytest.raises(RuntimeError) as e:
        fresh.fit(max_steps=5, progress=False)
    assert "20 non-finite losses or gradients in a row at step 0" in str(e.value)
    assert "No checkpoint has been written" in str(e.value) and "intact" not in str(e.value)
    assert not list_checkpoints(tmp_path / "fresh")

    saved = Stage1Trainer(tiny_config(*SMALL, "train.ckpt_every=2"), tmp_path / "saved")
    saved.fit(max_steps=2, progress=False)
    with torch.no_grad():
        saved.tok.encoder.patch_embed.weight[0, 0] = float("nan")  # every loss is NaN from now on
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(RuntimeError) as e:
        saved.fit(max_steps=5, progress=False)
    assert f"newest checkpoint is {tmp_path / 'saved/checkpoints/step_00000002'} (step 2)" in str(e.value)


# ---------------------------------------------------------------- 5: no usable image at all


def _unreadable_folder(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"broken_{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def test_a_folder_of_only_unreadable_images_stops_with_an_error(tmp_path):
    root = _unreadable_folder(tmp_path / "bad")
    # no linear path: its PCA initialisation would already refuse this folder (the loop must, without one)
    trainer = Stage1Trainer(tiny_config(f"data.source={root}", "train.batch_size=4", "model.linear_path=false"),
                            tmp_path / "r")
    # minutes: a bound for the code as it was, which drew empty batches at step 0 forever
    with pytest.warns(UserWarning, match="skipping image"), pytest.raises(ValueError) as e:
        trainer.fit(max_steps=2, minutes=0.25, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"not one usable image in a whole pass over the training data {root}")
    assert re.search(rf"e\.g\. {re.escape(str(root))}/broken_\d\.jpg: \S", msg)
    assert trainer.step == 0 and not list_checkpoints(tmp_path / "r")


def test_a_dry_epoch_is_not_final_while_a_left_out_image_is_usable(tmp_path):
    """9 files, batches of 4: each epoch leaves one out. When that one is the only good image, the epoch
    has no usable image but the data does: no stop."""
    from PIL import Image

    root = _unreadable_folder(tmp_path / "data")
    Image.fromarray(np.ascontiguousarray(load_photo("coffee")[:64, :64])).save(root / "good.png")
    dataset = ImageFolderDataset(root, 32, train=True)
    good = [i for i, p in enumerate(dataset.paths) if p.name == "good.png"][0]

    def fits(seed):  # epoch 0 leaves the good image out, epoch 1 does not start with it
        sampler = ResumableSampler(9, seed, batch=4)
        sampler.set_epoch(1)
        return ResumableSampler(9, seed, batch=4).dropped() == [good] and good not in sampler.order()[:4]

    seed = next(s for s in range(1000) if fits(s))
    stream = BatchStream(dataset, 4, ResumableSampler(9, seed, batch=4), collate_skip_bad)
    assert [len(next(stream)[0]) for _ in range(3)] == [0, 0, 0]  # epoch 0 and the first batch of epoch 1
    assert stream.epoch == 1 and not stream.dry

    (root / "good.png").write_bytes(b"not a png")  # now nothing is usable: dry after one epoch
    stream = BatchStream(ImageFolderDataset(root, 32, train=True), 4, ResumableSampler(9, seed, batch=4),
                         collate_skip_bad)
    for _ in range(3):
        next(stream)
    assert stream.dry and Path(stream.example[0]).parent == root and stream.example[1]


# ---------------------------------------------------------------- 6: PIL images given to encode


def test_pil_images_are_converted_like_the_same_files(tmp_path):
    """16-bit, float, transparent and EXIF-rotated images: `encode(PIL image)` used plain convert("RGB")
    (white, black, the hidden colour, sideways); now it sees exactly what the file loader gives."""
    from PIL import Image

    from msdd.data import center_crop_arr, load_image, to_tensor
    from msdd.tokenizer import Tokenizer

    ramp = np.linspace(0.0, 1.0, 48 * 40).reshape(48, 40)  # 40 wide, 48 high: a rotation changes the crop
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    rgba = np.zeros((48, 40, 4), np.uint8)
    rgba[..., 3] = (ramp * 255).astype(np.uint8)  # black, fading in from fully transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show upright
    Image.fromarray(np.ascontiguousarray(load_photo("coffee")[:48, :40])).save(tmp_path / "phone.jpg", exif=exif)

    tok = Tokenizer(tiny_config().model)
    files = [tmp_path / n for n in ("deep.png", "float.tif", "alpha.png", "phone.jpg")]
    expected = torch.stack([to_tensor(center_crop_arr(load_image(f), 32)) for f in files])
    for f, want in zip(files, expected):
        with Image.open(f) as img:
            assert torch.equal(tok.prepare_images(img)[0], want), f.name
    assert expected[0].mean().item() == pytest.approx(0.0, abs=0.1)  # mid grey, not white
    assert torch.equal(tok.encode([Image.open(f) for f in files]), tok.encode(expected))


# ---------------------------------------------------------------- 7: a path typo is not a Hub repo id


def test_a_missing_model_path_is_never_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    """The download function is replaced by one that records its calls and fails as offline: nothing in
    this test may reach the network."""
    import huggingface_hub

    from msdd.hub import BUNDLED, resolve_model_dir

    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("offline (HF_HUB_OFFLINE=1)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in ("runs/model", "./model", "~/msdd-nothere/model", "nothere/model.safetensors", "a/b/model", "model"):
        with pytest.raises(FileNotFoundError) as e:
            resolve_model_dir(typo)
        assert f"model directory {Path(typo).expanduser()} does not exist" in str(e.value)
        assert all(name in str(e.value) for name in BUNDLED)
    assert main(["reconstruct", "x.png", "--model", "runs/model"]) == 2
    assert "error: model directory runs/model does not exist" in capsys.readouterr().err
    assert calls == []  # before: runs/model went to the Hub

    # a name that can only be a repo id is tried on the Hub (no local match); the error names both readings
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_dir("nothere/model")
    assert calls == ["nothere/model"]
    assert "'nothere/model' is not a local directory (nothere/model does not exist)" in str(e.value)
    assert "could not be downloaded as a Hugging Face Hub repo id (OSError: offline" in str(e.value)
    assert main(["train", "--run-dir", str(tmp_path / "run"), *tiny_args(),
                 "--init-from", "nothere/model"]) == 2
    assert "is not a local directory" in capsys.readouterr().err


# ---------------------------------------------------------------- 8: guidance scale and latents of a decode


def test_decode_refuses_a_bad_cfg_and_non_finite_latents(tmp_path, capsys):
    from PIL import Image

    from msdd.tokenizer import Tokenizer

    tok = Tokenizer(tiny_config().model)
    z = torch.zeros(1, 8, 4)
    for guidance in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match=rf"guidance \(--cfg\) must be a finite number >= 0 .*got {guidance}"):
            tok.decode(z, guidance=guidance)
    z[0, 0, 0], z[0, 1, 1] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"latents contain 1 NaN and 1 inf values \(of 32\)"):
        tok.decode(z)
    # finite in float64, inf in the float32 the decoder runs in: used to decode to NaN images
    with pytest.raises(ValueError, match=r"latents hold values up to 1e\+39, beyond the float32 range"):
        tok.decode(torch.full((1, 8, 4), 1e39, dtype=torch.float64))

    photo = tmp_path / "photo.png"
    Image.fromarray(np.ascontiguousarray(load_photo("coffee")[:64, :64])).save(photo)
    assert main(["reconstruct", str(photo), "--cfg", "nan", "--out", str(tmp_path / "rec")]) == 2
    assert "error: guidance (--cfg) must be a finite number >= 0" in capsys.readouterr().err
    assert main(["eval", "--cfg", "-1", "--limit", "1", "--pca-source", "none", "--out", str(tmp_path / "e.json")]) == 2
    assert "error: guidance (--cfg) must be a finite number >= 0 (1 = no guidance" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists() and not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------- 9: config values that validate but cannot run


def test_config_values_that_cannot_run_are_config_errors(tmp_path, capsys):
    bad = [f"{s}.{k}_every=0" for s in ("train", "distill") for k in ("log", "ckpt", "grid")]
    bad += ["train.seed=-1", "model.image_size=0", "model.image_size=-64", "train.batch_size=0",
            "distill.batch_size=-4"]
    for override in bad:
        field, value = override.split("=")
        must = r"must be in \[0, 2\*\*63\)" if field == "train.seed" else r"must be >= \d"
        with pytest.raises(ValueError, match=rf"invalid config value for `{field}`: {must}.*got {value}"):
            tiny_config(override)
    with pytest.raises(ValueError, match="`model.image_size`"):  # plain used to accept it
        tiny_config("model.family=plain", "model.image_size=0")

    with pytest.raises(SystemExit) as exit_:
        _cli_train(tmp_path / "r", 0)
    assert exit_.value.code == 2 and "argument --max-steps: 0 is below 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--teacher", "tiny-64-teacher", "--run-dir", str(tmp_path / "d"), "--max-steps", "-3"])
    assert exit_.value.code == 2 and "argument --max-steps: -3 is below 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------- 11: eval with no usable image


def test_eval_with_no_usable_image_is_an_error(tmp_path, capsys):
    out = tmp_path / "eval.json"
    from msdd.eval.evaluate import evaluate
    from msdd.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="no usable image found in embedded with limit=0"):  # `msdd eval`: argparse's
        evaluate(Tokenizer.from_pretrained("tiny-64"), "embedded", limit=0, pca_source=None)
    bad = _unreadable_folder(tmp_path / "bad", 3)
    with pytest.warns(UserWarning, match="skipping"):
        assert main(["eval", "--data", str(bad), "--pca-source", "none", "--out", str(out)]) == 2
    assert f"error: no usable image found in {bad}: all 3 files were skipped" in capsys.readouterr().err
    assert not out.exists()  # before: a JSON of NaN metrics, exit 0


# ---------------------------------------------------------------- 2: reconstruct outputs whose names collide


def _photo(path: Path, y: int = 0, x: int = 0, name: str = "coffee") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(load_photo(name)[y : y + 48, x : x + 48])).save(path)
    return path


def _tiny_model(path: Path) -> Path:
    from msdd.tokenizer import Tokenizer

    Tokenizer(tiny_config().model).save_pretrained(path)
    return path


def test_reconstruct_gives_every_input_its_own_output(tmp_path, capsys):
    import csv

    model = _tiny_model(tmp_path / "m")
    a, b = _photo(tmp_path / "A/x.png"), _photo(tmp_path / "B/x.png", 100, 150)
    folder = tmp_path / "photos"
    _photo(folder / "good.png", name="astronaut"), _photo(folder / "good.jpg", name="china")
    _photo(folder / "sub/good.png", 50, 50)
    out = folder / "rec"  # inside an input folder: must not be read back on the next run
    want = {"A/x.png": "A__x.png.png", "B/x.png": "B__x.png.png", "good.jpg": "good.jpg.png",
            "good.png": "good.png.png", "sub/good": "sub__good.png"}
    for _ in range(2):  # before: 3 files and 5 rows (x, x, good, good, sub/good); then the outputs read as inputs
        assert main(["reconstruct", str(a), str(b), str(folder), "--model", str(model), "--out", str(out)]) == 0
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        assert sorted(r["name"] for r in rows) == sorted(want)
        assert sorted(p.name for p in (out / "reconstructions").iterdir()) == sorted(want.values())
    assert "5 images reconstructed (0 skipped)" in capsys.readouterr().out
    solo = _photo(tmp_path / "solo/only.png").parent  # --out the input folder itself: its outputs are not inputs
    for _ in range(2):
        assert main(["reconstruct", str(solo), "--model", str(model), "--out", str(solo)]) == 0
        assert [r["name"] for r in csv.DictReader(open(solo / "metrics.csv"))] == ["only"]

    from msdd.eval.reconstruct import unique_names

    # names that differ only in letter case collide on some file systems; a file given twice gets -2
    assert unique_names(["x", "x", "y"], [a, b, a]) == ["A/x.png", "B/x.png", "y"]
    assert unique_names(["X", "x"], [tmp_path / "X.png", a]) == ["X.png", "A/x.png"]
    assert unique_names(["x", "x"], [a, a]) == ["x.png", "x.png-2"]
    assert unique_names(["a/b", "a__b"], [a, b]) == ["A/x.png", "B/x.png"]  # both would be a__b.png


# ---------------------------------------------------------------- 10: latent-stats: where asked, in the stored dtype


def test_latent_stats_writes_where_asked_in_the_stored_dtype(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    from msdd.hub import BUNDLED
    from msdd.tokenizer import Tokenizer, export_tokenizer

    def stored_dtype(model_dir):
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"}

    monkeypatch.chdir(tmp_path)
    assert main(["latent-stats", "--model", "tiny-64", "--max-images", "4"]) == 2  # before: wrote ./tiny-64 in fp32
    err = capsys.readouterr().err
    assert "error: --model tiny-64 is a bundled model" in err and "pass --out DIR" in err
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "stats"
    assert main(["latent-stats", "--model", "tiny-64", "--out", str(out), "--max-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (latent statistics of embedded; weights stored as fp16, as in {BUNDLED['tiny-64']})" in printed
    record, written = Tokenizer.from_pretrained("tiny-64").metadata, Tokenizer.from_pretrained(out).metadata
    assert all(written[k] == record[k] for k in ("stage", "steps_trained", "teacher_sha256", "distill"))  # kept
    assert stored_dtype(out) == {"F16"} == stored_dtype(BUNDLED["tiny-64"])
    assert (out / "model.safetensors").stat().st_size == (BUNDLED["tiny-64"] / "model.safetensors").stat().st_size
    mean = torch.tensor(__import__("json").loads(printed.splitlines()[0])["mean"])
    assert torch.allclose(Tokenizer.from_pretrained(out).latent_mean, mean, atol=2e-3)

    # a model folder is updated in place and keeps its fp16 weights (before: rewritten in fp32)
    half = export_tokenizer(_tiny_model(tmp_path / "m32"), tmp_path / "m16", "fp16")
    size = (half / "model.safetensors").stat().st_size
    assert main(["latent-stats", "--model", str(half), "--max-images", "4"]) == 0
    assert f"wrote {half} " in capsys.readouterr().out
    assert stored_dtype(half) == {"F16"} and (half / "model.safetensors").stat().st_size == size
    assert Tokenizer.from_pretrained(half).metadata["weights_dtype"] == "fp16"


# ---------------------------------------------------------------- 12: distillation resume with changed train.* fields


def test_distill_resume_refuses_changed_train_fields_the_distillers_read():
    import dataclasses
    import json

    from msdd.config import config_from_json, to_dict
    from msdd.train import distill, distill_ssdd, distiller, loop
    from msdd.train.distiller import check_resume

    # what the distillers read, found in their code (and the shared loop's), not a hand list
    source = "".join(Path(m.__file__).read_text() for m in (distill, distill_ssdd, distiller, loop))
    read = set(re.findall(r"\bcfg\.train\.(\w+)", source)) - {"keep_checkpoints"}  # rotation only
    assert {"seed", "bf16", "betas", "grad_clip", "linear_lr_scale", "min_lr_ratio"} <= read

    def changed(v):
        return (not v if isinstance(v, bool) else v + 1 if isinstance(v, int) else v / 2 + 0.1
                if isinstance(v, float) else tuple(x / 2 for x in v))

    cfg = tiny_config()
    stored = config_from_json(json.dumps(to_dict(cfg)))  # as a checkpoint stores it
    for field in sorted(read):
        train = dataclasses.replace(cfg.train, **{field: changed(getattr(cfg.train, field))})
        new = dataclasses.replace(cfg, train=train)
        with pytest.raises(ValueError, match=rf"cannot resume runs/d: .* 1 field\(s\):\n  train\.{field}: "):
            check_resume(stored, new, Path("runs/d"))  # before: accepted
    both = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=5, bf16=not cfg.train.bf16))
    with pytest.raises(ValueError, match=r"differs in 2 field\(s\):\n  train\.bf16: .*\n  train\.seed: 0 -> 5"):
        check_resume(stored, both, Path("runs/d"))
    # stage-1 settings the distillers never read stay free
    stage1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5, max_steps=7, batch_size=2,
                                                                log_every=3, keep_checkpoints=9, init_from="x"))
    check_resume(stored, stage1, Path("runs/d"))
    # so does the cadence of logs and checkpoints, the loader's workers, compiling and the run's name
    cadence = dataclasses.replace(cfg, name="other", data=dataclasses.replace(cfg.data, num_workers=3),
                                  distill=dataclasses.replace(cfg.distill, log_every=7, ckpt_every=7, grid_every=7,
                                                              compile=not cfg.distill.compile))
    check_resume(stored, cadence, Path("runs/d"))


# ---------------------------------------------------------------- 13: unclear errors


def test_damaged_model_folders_and_bad_folder_arguments_are_clear_errors(tmp_path, capsys):
    import json
    import shutil

    model = _tiny_model(tmp_path / "m")
    photo = _photo(tmp_path / "p.png")
    from safetensors.torch import load as load_bytes, save as save_bytes

    weights = (model / "model.safetensors").read_bytes()
    meta = json.loads((model / "config.json").read_text())
    state = load_bytes(weights)
    last = sorted(state)[-1]
    cases = {
        "one-extra": ("model.safetensors", save_bytes({**state, "extra.weight": torch.zeros(2)}),
                      r"does not match its config.json: tensors 1 unexpected \(extra.weight\)\. The two files"),
        "one-missing": ("model.safetensors", save_bytes({k: v for k, v in state.items() if k != last}),
                        rf"does not match its config.json: tensors 1 missing \({re.escape(last)}\)\. The two files"),
        "truncated": ("model.safetensors", weights[: len(weights) // 2], "is damaged or not a safetensors file"),
        "cut-header": ("model.safetensors", weights[:1000], "is damaged or not a safetensors file"),
        "empty": ("model.safetensors", b"", r"is damaged or not a safetensors file \(0 bytes"),
        "random": ("model.safetensors", np.random.default_rng(0).bytes(4096), "is damaged or not a safetensors"),
        "not-json": ("config.json", b'{"format": "msdd-tokenizer",', "is not valid JSON"),
        "list": ("config.json", b"[1, 2]", r"is not an msdd model config \(a JSON list"),
        "no-model": ("config.json", json.dumps({k: v for k, v in meta.items() if k != "model"}).encode(),
                     r"has no \"model\" section"),
        "newer": ("config.json", json.dumps(meta | {"format_version": 2}).encode(),
                  r"has format_version 2, newer than this msdd reads \(1\); upgrade msdd"),
    }
    capsys.readouterr()
    for name, (file, data, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(model, bad)
        (bad / file).write_bytes(data)
        assert main(["reconstruct", str(photo), "--model", str(bad), "--out", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        assert re.search(rf"^error: {re.escape(str(bad / file))} {message}", err, re.M), (name, err)
    assert not (tmp_path / "o").exists()

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for argv, flag in [(["reconstruct", str(photo), "--model", str(model), "--out", str(afile)], "--out"),
                       (["export", "--model", str(model), "--out", str(afile / "sub")], "--out"),
                       (["latent-stats", "--model", str(model), "--out", str(afile)], "--out"),
                       (["train", "--run-dir", str(afile), "--max-steps", "1"], "--run-dir"),
                       (["distill", "--teacher", str(model), "--run-dir", str(afile), "--max-steps", "1"],
                        "--run-dir")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        given = argv[argv.index(flag) + 1]
        where = f" ({afile} is a file)" if given != str(afile) else ""  # a parent folder that is a file is named
        assert f"error: {flag} {given} is an existing file, not a folder{where}; pass a folder" in err
    assert afile.read_text() == "not a folder"


def test_decode_refuses_steps_that_are_not_whole_numbers():
    from msdd.config.model import MAX_STEPS
    from msdd.tokenizer import Tokenizer

    tok = Tokenizer(tiny_config().model)  # 3 stages
    z = torch.zeros(1, 8, 4)
    for steps in (1.7, [1.9, 1, 1], True, [True, 1, 1], "2", 2.0):  # before: truncated, or a TypeError
        with pytest.raises(ValueError, match=r"steps must be whole numbers >= 1 .*list of 3 ints"):
            tok.decode(z, steps=steps)
    assert tok.resolve_steps(2) == (2, 2, 2) and tok.resolve_steps([np.int64(1), 2, 3]) == (1, 2, 3)
    assert tok.resolve_steps(torch.tensor([1, 1, 2])) == (1, 1, 2)
    for steps, got in (([1, 0, 1], "(1, 0, 1)"), ([1, 1], "(1, 1)"), (0, "(0, 0, 0)")):
        with pytest.raises(ValueError, match=re.escape(f"steps must be an int >= 1 or a list of 3 ints >= 1 (one per "
                                                       f"stage), got {got}")):
            tok.resolve_steps(steps)
    with pytest.raises(ValueError, match="steps 1,000,000,000 per stage is more than msdd decodes"):
        tok.resolve_steps([1, 10**9, 1])  # the largest entry, wherever it is
    assert tok.resolve_steps(MAX_STEPS) == (MAX_STEPS,) * 3  # the limit itself is decoded


def test_encode_refuses_an_empty_batch():
    from msdd.tokenizer import Tokenizer

    tok = Tokenizer(tiny_config().model)
    for empty in (torch.zeros(0, 3, 32, 32), []):  # before: RuntimeError from min() / torch.stack
        with pytest.raises(ValueError, match=r"(?i)empty|no image|0 images"):
            tok.encode(empty)


# ---------------------------------------------------------------- reconstruction noise seeded per image


def test_reconstruct_noise_is_seeded_per_image_not_per_batch(tmp_path):
    """An image's decode noise depends only on its name and --seed: alone, among other files (before and
    after it), given as a file beside others, and at any --batch-size, it is reconstructed the same (before:
    one generator for the whole run, so its noise depended on its batch and on the files before it).

    Decoded alone in its batch (--batch-size 1) it is bit-identical. In a batch with others, the batched
    matrix products round differently (~1e-6) from those of a batch of one, which moves a rare pixel by one
    level of 255 (measured: at most 1 value of 12,288 per image); different noise moves most of them."""
    from PIL import Image

    def crop(path: Path, name: str, y: int, x: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(load_photo(name)[y : y + 80, x : x + 80])).save(path)
        return path

    a = crop(tmp_path / "solo/m.png", "coffee", 100, 150)
    crowd = tmp_path / "crowd"  # m.png among files listed before and after it
    crop(crowd / "m.png", "coffee", 100, 150)
    crop(crowd / "a.png", "astronaut", 0, 0), crop(crowd / "z.png", "china", 50, 50)
    crop(crowd / "sub/b.png", "coffee", 0, 0)
    other = crop(tmp_path / "other/k.png", "astronaut", 120, 200)

    def rec_m(*argv: str) -> np.ndarray:  # the bundled 64 px student, whose decode depends on its noise
        out = tmp_path / f"rec{len(list(tmp_path.glob('rec*')))}"
        assert main(["reconstruct", *argv, "--crop", "--out", str(out)]) == 0  # batches of 64 px crops
        return np.asarray(Image.open(out / "reconstructions" / "m.png")).astype(int)

    def changed(x: np.ndarray, y: np.ndarray) -> int:
        assert x.shape == y.shape == (64, 64, 3)
        return int((x != y).sum())

    alone = rec_m(str(a.parent))
    for argv in ([str(a)], [str(crowd), "--batch-size", "1"], [str(other), str(a), "--batch-size", "1"]):
        assert changed(alone, rec_m(*argv)) == 0, argv  # before: thousands of values changed
    for argv in ([str(crowd)], [str(crowd), "--batch-size", "3"], [str(other), str(a)],
                 [str(a), str(other), "--batch-size", "2", "--seed", "0"]):
        got = rec_m(*argv)
        assert changed(alone, got) <= 8 and np.abs(alone - got).max() <= 1, argv  # before: up to ~0.5 dB
    twin = crop(tmp_path / "twins/m.jpg", "astronaut", 0, 0)  # its name collides: outputs m.png.png and m.jpg.png
    out = tmp_path / "rec-twins"
    assert main(["reconstruct", str(a), str(twin), "--crop", "--batch-size", "1", "--out", str(out)]) == 0
    named = np.asarray(Image.open(out / "reconstructions" / "m.png.png")).astype(int)
    assert changed(alone, named) == 0  # was: the noise of the name m.png, not m
    reseeded = rec_m(str(a), "--seed", "1")
    assert changed(alone, reseeded) > 2000  # the noise matters, so the checks above can fail
    assert changed(reseeded, rec_m(str(crowd), "--seed", "1", "--batch-size", "1")) == 0

    from msdd.eval.reconstruct import image_generators

    draw = lambda gs: [torch.randn(3, generator=g) for g in gs]  # noqa: E731
    x, y = draw(image_generators(0, ["m", "sub/b"])), draw(image_generators(0, ["sub/b", "m"]))
    assert torch.equal(x[0], y[1]) and not torch.equal(x[0], x[1])
    assert not torch.equal(x[0], draw(image_generators(1, ["m"]))[0])
    as_eval = torch.Generator().manual_seed(2 * 1_000_003 + 5)  # an index key: seeded as msdd eval seeds image 5
    assert torch.equal(draw(image_generators(2, [5]))[0], torch.randn(3, generator=as_eval))
    # a name key: the first 63 bits of sha256("seed:name"), the name's own bytes where it is not UTF-8 (os.listdir's
    # surrogates), so that a file's noise is the same on every machine and in every release
    import hashlib

    for name, raw in (("sub/b", b"1:sub/b"), ("caf\udce9", b"1:caf\xe9")):
        value = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") >> 1
        want = torch.randn(3, generator=torch.Generator().manual_seed(value))
        assert torch.equal(draw(image_generators(1, [name]))[0], want), name


# ---------------------------------------------------------------- more unclear errors (issue 14, second probe)


def test_integer_weights_are_refused_not_cast(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _tiny_model(tmp_path / "m")
    weights = model / "model.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(weights).items()}, weights)  # before: rc 0, a model of 0s
    photo = str(_photo(tmp_path / "p.png"))
    assert main(["reconstruct", photo, "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    assert re.search(rf"^error: {re.escape(str(weights))} holds integer tensors where the model has float weights",
                     capsys.readouterr().err, re.M)


def test_non_finite_weights_are_refused_by_name(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _tiny_model(tmp_path / "m")
    weights = model / "model.safetensors"
    state = load_file(weights)
    state["decoder.final.linear.bias"][0] = float("nan")  # before: it loaded, and every decoded pixel was NaN
    save_file(state, weights)
    photo = str(_photo(tmp_path / "p.png"))
    assert main(["reconstruct", photo, "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    assert re.search(rf"^error: {re.escape(str(weights))} holds NaN or infinite values in 1 tensor\(s\): "
                     r"\['decoder.final.linear.bias'\]", capsys.readouterr().err, re.M)


def test_pretrained_files_that_are_pickles_are_refused(tmp_path, capsys):
    import pickle
    from fractions import Fraction

    bad = tmp_path / "vgg16.pth"
    bad.write_bytes(pickle.dumps({"features.0.weight": Fraction(1, 2)}))  # a pickle naming a Python class
    argv = ["eval", "--model", str(_tiny_model(tmp_path / "m")), "--data", "embedded", "--limit", "1",
            "--vgg-weights", str(bad), "--out", str(tmp_path / "e.json")]
    assert main(argv) == 2  # before: rc 1 and torch's advice to retry with weights_only=False
    err = capsys.readouterr().err
    assert f"error: --vgg-weights {bad} is not a plain tensor state dict" in err and "weights_only=False" not in err


def test_a_preset_file_that_is_not_a_mapping_is_a_clear_error(tmp_path, capsys):
    for name, text, message in [("list.yaml", "- 1\n- 2\n", "holds a YAML list, not a mapping of config sections"),
                                ("broken.yaml", "model: {a: [\n", "is not valid YAML")]:
        path = tmp_path / name
        path.write_text(text)
        assert main(["train", "--preset", str(path), "--run-dir", str(tmp_path / "r"), "--max-steps", "1"]) == 2
        assert f"error: {path} {message}" in capsys.readouterr().err  # before: AttributeError / YAMLError, rc 1
    assert not (tmp_path / "r").exists()


def test_a_device_this_machine_lacks_is_a_usage_error(tmp_path, capsys):
    argv = ["reconstruct", str(_photo(tmp_path / "p.png")), "--model", "tiny-64-student", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--device", "tpu9"])  # before: RuntimeError traceback after loading the model
    assert e.value.code == 2 and "unknown device 'tpu9'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            main([*argv, "--device", "cuda"])
        assert e.value.code == 2 and "cuda: no cuda device is visible on this machine" in capsys.readouterr().err


def test_gif_and_tiff_files_in_folders_are_read(tmp_path):
    from PIL import Image

    png = _photo(tmp_path / "src.png")
    (tmp_path / "imgs").mkdir()
    for suffix in ("gif", "tif", "TIFF"):
        Image.open(png).save(tmp_path / f"imgs/a_{suffix}.{suffix}")
    ds = ImageFolderDataset(tmp_path / "imgs", resolution=32, train=False)  # before: "no images found"
    records = [ds[i] for i in range(len(ds))]
    assert len(records) == 3 and all(image is not None and why is None for image, _, why in records)
    gif = next(image for image, path, _ in records if path.endswith(".gif"))
    assert (gif - records[0][0]).abs().mean() < 0.05  # the GIF's first frame is the photo (palette-rounded)


def test_a_half_precision_tokenizer_says_how_to_run_it():
    from msdd.tokenizer import Tokenizer

    tok = Tokenizer(tiny_config().model).half()
    for call in (lambda: tok.encode(torch.zeros(1, 3, 32, 32)), lambda: tok.decode(torch.zeros(1, 8, 4))):
        with pytest.raises(ValueError, match=r"weights are torch.float16 \(.*\); .*tok.float\(\).*bf16=True"):
            call()  # before: "Input type (float) and bias type (c10::Half) should be the same"
    tok = Tokenizer(tiny_config().model)
    tok.decoder.final.half()  # one module of the decoder: its first parameter was float32, its last ones not
    with pytest.raises(ValueError, match=r"weights are torch.float16 \(decoder.final\."):
        tok.decode(torch.zeros(1, 8, 4))


def test_a_shard_pattern_that_matches_no_file_is_a_config_error(tmp_path, capsys):
    pattern = str(tmp_path / "train-{000..002}.tar")
    argv = ["train", "--run-dir", str(tmp_path / "r"), *tiny_args(*SMALL, f"data.source={pattern}"), "--max-steps", "1"]
    assert main(argv) == 2  # before: the brace pattern expanded to three names and training tried to read them
    assert f"data.source='{pattern}': 3 of its 3 shard file(s) do not exist" in capsys.readouterr().err
