"""Stage-1 trainer: it learns, it resumes exactly, it survives damaged checkpoints, it refuses mismatches."""

import json

import pytest
import torch
from safetensors.torch import load_file

from msdd.train.checkpoint import latest_checkpoint, list_checkpoints
from msdd.train.optim import cosine_schedule
from msdd.train.stage1 import Stage1Trainer

from conftest import tiny_config


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "log.jsonl")]


def test_overfit_few_images_drives_loss_down(photo_folder, tmp_path):
    # the paper's network (no linear path, v-prediction): with the PCA start the loss has little left to lose
    cfg = tiny_config(f"data.source={photo_folder}", f"data.eval_source={photo_folder}", "train.log_every=1",
                      "train.ckpt_every=1000", "train.batch_size=6", "model.linear_path=false",
                      "model.flow.prediction=v", "model.flow.t_sampling=logit_normal")
    trainer = Stage1Trainer(cfg, tmp_path / "run")
    trainer.fit(max_steps=400, progress=False)
    losses = _losses(tmp_path / "run")
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)  # flow-matching losses have a floor: the noise is unpredictable
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert list((tmp_path / "run" / "grids").glob("*.png"))


def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config("train.log_every=1", "train.ckpt_every=5")
    straight = Stage1Trainer(cfg, tmp_path / "a")
    straight.fit(max_steps=12, progress=False)

    first = Stage1Trainer(cfg, tmp_path / "b")
    before = first.fit(max_steps=7, progress=False)
    resumed = Stage1Trainer(cfg, tmp_path / "b", require_resume=True)
    assert resumed.step == 7 and resumed.train_seconds == before["seconds"]  # the time the checkpoint holds
    after = resumed.fit(max_steps=12, progress=False)
    assert after["seconds"] == pytest.approx(resumed.train_seconds)  # training time summed over both runs
    # the training time this run added lies within its wall time (which also holds the final checkpoint's write:
    # comparing that wall time with both runs' training time failed when an fsync took longer than 7 tiny steps)
    assert 0 < after["seconds"] - before["seconds"] <= after["seconds_this_run"]

    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a, b = straight.tok.state_dict(), resumed.tok.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema.module.state_dict(), resumed.ema.module.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    cfg = tiny_config("train.ckpt_every=3")
    Stage1Trainer(cfg, tmp_path / "r").fit(max_steps=6, progress=False)
    ckpts = list_checkpoints(tmp_path / "r")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="damaged"):
        assert latest_checkpoint(tmp_path / "r") == ckpts[0]
    with pytest.warns(UserWarning, match="damaged"):
        assert Stage1Trainer(cfg, tmp_path / "r").step == 3


def test_resume_with_different_config_lists_fields(tmp_path):
    Stage1Trainer(tiny_config(), tmp_path / "r").fit(max_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"train\.lr.*\n.*model\.decoder\.depth|model\.decoder\.depth.*\n.*train\.lr"):
        Stage1Trainer(tiny_config("train.lr=5e-4", "model.decoder.depth=3"), tmp_path / "r")
    # logging cadence may change freely
    assert Stage1Trainer(tiny_config("train.log_every=7"), tmp_path / "r").step == 2


def test_require_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        Stage1Trainer(tiny_config(), tmp_path / "new", require_resume=True)


def test_state_file_loads_with_weights_only(tmp_path):
    Stage1Trainer(tiny_config(), tmp_path / "r").fit(max_steps=2, progress=False)
    ckpt = latest_checkpoint(tmp_path / "r")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 2 and "optimizer" in state and "rng" in state
    assert set(load_file(str(ckpt / "ema.safetensors"))) == set(load_file(str(ckpt / "model.safetensors")))


def test_missing_vgg_weights_for_lpips_names_file_and_option(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("MSDD_VGG16_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*--vgg-weights[\s\S]*lpips_weight"):
        Stage1Trainer(tiny_config("model.flow.lpips_weight=0.1"), tmp_path / "r")


def test_init_from_fine_tunes_a_trained_model_and_resume_takes_precedence(tmp_path, capsys):
    from msdd import Tokenizer
    from msdd.config import load_config

    base = ["train.log_every=1", "train.ckpt_every=3", "train.batch_size=4", "train.init_from=tiny-64-teacher"]
    cfg = load_config("tiny-64", base + ["model.flow.loss_weighting=none"])
    trainer = Stage1Trainer(cfg, tmp_path / "ft")
    assert "model.flow.loss_weighting: 'stage' -> 'none'" in capsys.readouterr().out
    shipped = Tokenizer.from_pretrained("tiny-64-teacher").state_dict()
    for name, t in trainer.tok.state_dict().items():
        torch.testing.assert_close(t, shipped[name], rtol=0, atol=0, msg=name)
    trainer.fit(max_steps=3, progress=False)
    trained = {k: v.clone() for k, v in trainer.tok.state_dict().items()}
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)

    capsys.readouterr()
    for again in (cfg, load_config("tiny-64", base[:-1] + ["model.flow.loss_weighting=none"])):  # with or without it
        resumed = Stage1Trainer(again, tmp_path / "ft", require_resume=True)  # the checkpoint, not the init weights
        assert resumed.step == 3 and "train.init_from" not in capsys.readouterr().out
        for name, t in resumed.tok.state_dict().items():
            torch.testing.assert_close(t, trained[name], rtol=0, atol=0, msg=name)

    wrong = load_config("tiny-64", base + ["model.decoder.depth=2"])
    with pytest.raises(ValueError, match=r"do not fit(.|\n)*model\.decoder\.depth: 4 -> 2"):
        Stage1Trainer(wrong, tmp_path / "wrong")


def test_loss_weighting_that_prediction_x_ignores_is_named(tmp_path, recwarn):
    """flow_loss weights the v-prediction loss only: under prediction x a weighting is accepted (saved models carry
    one) and does nothing, so stage 1 warns with the fix; prediction v takes it without a word."""
    with pytest.warns(UserWarning, match=r"model\.flow\.loss_weighting=stage does nothing with model\.flow\.predicti"):
        Stage1Trainer(tiny_config("model.flow.prediction=x", "model.flow.loss_weighting=stage"), tmp_path / "x")
    recwarn.clear()
    Stage1Trainer(tiny_config("model.flow.prediction=v", "model.flow.loss_weighting=stage"), tmp_path / "v")
    Stage1Trainer(tiny_config("model.flow.prediction=x", "model.flow.loss_weighting=none"), tmp_path / "n")
    assert not [w for w in recwarn if "loss_weighting" in str(w.message)]


def test_stage1_gradients_are_clipped_to_grad_clip(tmp_path):
    """train.grad_clip bounds the norm of the gradient the optimiser steps with: with a tiny bound the gradients
    left after the step have exactly that norm, while the logged norm (before clipping) is larger. The logged lr
    is the warm-up's second factor, 2 / warmup: the trainer builds its schedule from train.warmup_steps."""
    cfg = tiny_config("train.batch_size=4", "train.grad_clip=0.001")
    trainer = Stage1Trainer(cfg, tmp_path / "r")
    out = trainer.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    clipped = torch.norm(torch.stack([p.grad.norm() for p in trainer.trained_parameters() if p.grad is not None]))
    assert out["grad_norm"] > 0.001 and clipped.item() == pytest.approx(0.001, rel=1e-3)
    assert out["lr"] == pytest.approx(cfg.train.lr * 2 / cfg.train.warmup_steps)


def test_cosine_schedule_against_hand_values():
    """Linear warm-up over 5 steps whose first step already trains ((step + 1) / warmup, not 0), the base lr at
    the end of the warm-up, cosine decay to min_ratio at `total` (half-way: the mean of 1 and min_ratio), then
    min_ratio for good; read from the learning rate the optimiser is given at each step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_schedule(opt, warmup=5, total=25, min_ratio=0.1)
    lrs = []
    for _ in range(31):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    hand = {0: 0.2, 1: 0.4, 4: 1.0, 5: 1.0, 15: 0.55, 25: 0.1, 30: 0.1}
    assert {s: lrs[s] / 2.0 for s in hand} == pytest.approx(hand)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after the warm-up
