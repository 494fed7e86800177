"""The Hugging Face Hub: loading by repo id from the standard cache offline, and `msdd push` (issue 17)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from msdd.cli import main
from msdd.hub import BUNDLED
from msdd.tokenizer import Tokenizer

from conftest import assert_same_weights

REV = "0123456789abcdef0123456789abcdef01234567"


def test_repo_id_resolves_from_a_real_hub_cache_offline(tmp_path):
    """A real huggingface_hub cache layout (models--owner--name/snapshots/REV, refs/main) under HF_HUB_CACHE:
    with HF_HUB_OFFLINE=1 the repo id loads from it, and an uncached repo id fails with a clear error."""
    # a dotted repo name (as whisper-tiny.en) was taken for a file path; a name's case is its own in the cache
    for name in ("tiny-64", "Tiny-64.en"):
        repo = tmp_path / "hub" / f"models--someone--{name}"
        snap = repo / "snapshots" / REV
        snap.mkdir(parents=True)
        for file in ("config.json", "model.safetensors"):
            (snap / file).write_bytes((BUNDLED["tiny-64-student"] / file).read_bytes())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REV)
    script = textwrap.dedent("""
        import torch
        from msdd.cli import main
        from msdd.tokenizer import Tokenizer
        bundled = Tokenizer.from_pretrained("tiny-64-student")
        for repo_id in ("someone/tiny-64", "someone/Tiny-64.en"):
            hub = Tokenizer.from_pretrained(repo_id)
            assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), bundled.state_dict().values()))
        assert main(["info", "--model", "someone/missing"]) == 2
    """)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": os.environ["PYTHONPATH"]}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "'someone/missing' is not a local directory" in r.stderr and "could not be downloaded" in r.stderr


def test_only_a_files_suffix_makes_a_name_a_path():
    from msdd.hub import looks_like_path

    assert looks_like_path("someone/model.safetensors") and looks_like_path("runs/config.JSON")
    assert not looks_like_path("someone/tiny-64.en") and not looks_like_path("someone/model-v1.5")
    assert looks_like_path("nowhere-here/a/model")  # a repo id has one "/"


def test_push_stages_a_model_card_and_refuses_offline(tmp_path, capsys, monkeypatch):
    model = BUNDLED["tiny-64-student"]
    evaluation = {"metrics": {"psnr": 27.8, "ssim": 0.72}, "protocol": {"images": 42},
                  "baselines": {"pca": {"method": "PCA-256", "floats": 256, "psnr": 27.91, "ssim": 0.735}}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    staged = tmp_path / "staged"
    assert main(["push", str(model), "me/tiny", "--eval-json", str(tmp_path / "eval.json"),
                 "--stage-only", str(staged)]) == 0
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (staged / "README.md").read_text()
    assert "library_name: msdd" in card and "Tokenizer.from_pretrained('me/tiny')" in card
    assert "latents (B, 32, 8) (256 floats, 48x" in card and "| this model | 256 | 27.80 | 0.7200 |" in card
    assert "| PCA-256 | 256 | 27.91 | 0.7350 |" in card and "steps_trained: 900" in card
    a, b = Tokenizer.from_pretrained(staged), Tokenizer.from_pretrained(model)  # what is uploaded loads as the model
    assert_same_weights(a, b)
    assert capsys.readouterr().out == f"wrote {staged} (nothing uploaded)\n"
    # without --eval-json: the eval.json inside the model folder, if there is one
    local = tmp_path / "model"
    Tokenizer.from_pretrained(model).save_pretrained(local)
    (local / "eval.json").write_text(json.dumps(evaluation))
    assert main(["push", str(local), "me/tiny", "--stage-only", str(tmp_path / "s1")]) == 0
    assert "| this model | 256 | 27.80 | 0.7200 |" in (tmp_path / "s1" / "README.md").read_text()
    (local / "eval.json").write_text("[]")  # checked as --eval-json is, naming the file
    assert main(["push", str(local), "me/tiny", "--stage-only", str(tmp_path / "s3")]) == 2
    assert f"error: {local / 'eval.json'}: not the results of one model" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    capsys.readouterr()
    assert main(["push", str(model), "me/tiny", "--eval-json", str(tmp_path / "bad.json"), "--stage-only",
                 str(tmp_path / "s2")]) == 2
    assert "--eval-json" in capsys.readouterr().err
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(model), "me/tiny"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_an_export_folder_passed_as_a_model_says_what_loads_it(tmp_path):
    onnx, diffusers = tmp_path / "onnx", tmp_path / "diffusers"
    for folder, files in ((onnx, ("encoder.onnx", "decoder.onnx", "onnx.json")),
                          (diffusers, ("config.json", "diffusion_pytorch_model.safetensors"))):
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match="an ONNX export: run it with msdd.integrations.onnx.OnnxTokenizer"):
        Tokenizer.from_pretrained(onnx)
    with pytest.raises(FileNotFoundError, match="a diffusers export: load it with .*AutoencoderMSDD.from_pretrained"):
        Tokenizer.from_pretrained(diffusers)


def test_a_saved_model_keeps_its_training_record_but_not_its_files_description(tmp_path, monkeypatch):
    from safetensors import safe_open

    import msdd.hub

    tok = Tokenizer.from_pretrained()  # the bundled student: stored in fp16, exported from a float32 model
    tok.save_pretrained(tmp_path / "copy")
    meta = json.loads((tmp_path / "copy" / "config.json").read_text())
    shipped = tok.metadata
    assert {k: meta[k] for k in ("stage", "steps_trained", "teacher_sha256", "distill")} == \
        {k: shipped[k] for k in ("stage", "steps_trained", "teacher_sha256", "distill")}  # was: all dropped
    assert "weights_dtype" not in meta and "exported_from_sha256" not in meta
    staged = {}

    def stage_only(directory, repo_id, **kwargs):  # push_to_hub without the upload
        staged["meta"] = json.loads((Path(directory) / "config.json").read_text())
        with safe_open(Path(directory) / "model.safetensors", "pt") as f:
            staged["dtypes"] = {f.get_tensor(k).dtype for k in f.keys()}
        return "staged"

    monkeypatch.setattr(msdd.hub, "push_model", stage_only)
    assert tok.push_to_hub("someone/model") == "staged"
    assert staged["dtypes"] == {torch.float32} and "weights_dtype" not in staged["meta"]  # was: said fp16
    assert staged["meta"]["stage"] == 2


def test_a_path_typo_is_reported_as_one_not_sent_to_the_hub(tmp_path, monkeypatch):
    """`runs/modle` (a typo, while runs/ exists here) and a bare `modle` can only be local paths: they fail at once
    with "does not exist", never as a Hub download (offline here, so a download attempt would say "could not be
    downloaded"); only an owner/name that could be a repo id goes to the Hub."""
    import huggingface_hub.constants

    from msdd.hub import resolve_model_dir

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/modle", "modle"):
        with pytest.raises(FileNotFoundError, match=f"model directory {name} does not exist"):
            resolve_model_dir(name)
    with pytest.raises(FileNotFoundError, match="could not be downloaded as a Hugging Face Hub repo id"):
        resolve_model_dir("someone/modle")


def test_an_atomic_folder_clears_only_temporaries_of_dead_writers(tmp_path):
    """`atomic_folder` (exports, `msdd push` staging) removes the temporary folder a killed writer left, but not
    that of a writer still running (another process exporting to the same path), and a block that fails leaves
    neither the folder nor its temporary."""
    import os

    from msdd.io import atomic_folder

    dead, live = tmp_path / ".out.tmp-999999999", tmp_path / f".out.tmp-{os.getppid()}"
    dead.mkdir()
    live.mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert not dead.exists() and live.exists()
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "other") as tmp:
            (tmp / "b.txt").write_text("b")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_atomic_writes_replace_a_file_whole_or_leave_the_old_one(tmp_path, monkeypatch):
    """`atomic_write_bytes` and `atomic_save_safetensors` replace a file whole; a write that fails (a full disk: the
    fsync there, safetensors' own error here, after part of the file was written) leaves the old file and no
    temporary, and safetensors' error is an OSError naming the file. Weights are written contiguous, on the CPU,
    with their metadata, and readable by all (0644) as model folders are shared."""
    import errno
    import os

    import safetensors
    from safetensors import safe_open
    from safetensors.torch import load_file

    import msdd.io
    from msdd.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text

    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            atomic_write_bytes(path, b"newer")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    weights = tmp_path / "w.safetensors"
    transposed = torch.arange(6.0).view(2, 3).t()
    atomic_save_safetensors({"a": torch.ones(2, requires_grad=True), "t": transposed}, weights, metadata={"k": "v"})
    assert torch.equal(load_file(weights)["t"], transposed) and weights.stat().st_mode & 0o777 == 0o644
    with safe_open(weights, "pt") as f:
        assert f.metadata() == {"k": "v"}

    def partial(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"part")
        raise safetensors.SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(msdd.io, "save_file", partial)
    with pytest.raises(OSError, match=f"cannot write {weights}: I/O error: No space left"):
        atomic_save_safetensors({"a": torch.zeros(2)}, weights)
    assert torch.equal(load_file(weights)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "w.safetensors"]


def test_a_latent_space_digest_covers_the_encoder_and_latent_statistics_only():
    """A generator's latents fit any tokenizer of the same `latent_space_sha256`: the shipped teacher and its student
    share it; a changed decoder keeps it, a changed encoder weight or latent statistic does not. The digest of named
    tensors is sha256 over, per tensor, "name:dtype:(count,);" and its bytes: stable across versions (generators and
    `msdd reconstruct --skip-existing` store it), blind to a reshape that the architecture would fix anyway."""
    import hashlib

    import numpy as np

    from msdd.hub import latent_space_sha256, tensors_sha256

    teacher, student = Tokenizer.from_pretrained("tiny-64-teacher"), Tokenizer.from_pretrained("tiny-64-student")
    digest = latent_space_sha256(teacher)
    assert latent_space_sha256(student) == digest
    with torch.no_grad():
        student.decoder.final.linear.bias.add_(1.0)
        assert latent_space_sha256(student) == digest
        student.latent_std[0] += 1e-3
        assert latent_space_sha256(student) != digest
        teacher.encoder.patch_embed.weight.view(-1)[0] += 1e-3
        assert latent_space_sha256(teacher) != digest
    t = torch.arange(6.0)
    by_hand = hashlib.sha256(b"a:torch.float32:(6,);" + np.arange(6, dtype="<f4").tobytes()).hexdigest()
    assert tensors_sha256({"a": t}) == tensors_sha256({"a": t.view(2, 3)}) == by_hand
    digests = {tensors_sha256(d) for d in ({"a": t}, {"b": t}, {"a": t.double()}, {"a": t.flip(0)}, {"a": t[:5]},
                                           {"a": t, "b": t})}
    assert len(digests) == 6


def test_a_model_card_describes_a_teacher_and_keeps_only_the_record(tmp_path):
    """`msdd push --stage-only` of the shipped teacher saved under folders that do not exist yet: a stage-1 card whose
    training record leaves out the file's own keys (format, format_version, the architecture)."""
    model = tmp_path / "a" / "b" / "teacher"
    Tokenizer.from_pretrained("tiny-64-teacher").save_pretrained(model)
    staged = tmp_path / "c" / "staged"
    assert main(["push", str(model), "me/teacher", "--stage-only", str(staged)]) == 0
    card = (staged / "README.md").read_text()
    assert "family `msdd`, stage 1 (the multi-step teacher): 64 x 64 px RGB images" in card
    record = card.split("## Training record\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert record == ["- stage: 1", f"- steps_trained: {Tokenizer.from_pretrained(model).metadata['steps_trained']}"]
