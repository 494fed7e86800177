"""Stage-1 trainer: it learns, it resumes exactly, it survives damaged checkpoints, it refuses mismatches."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msdd.tokenizer import Tokenizer
from msdd.train.checkpoint import latest_checkpoint, list_checkpoints
from msdd.train.ema import EMA
from msdd.train.budget import budgeted_config, fixed_steps
from msdd.train.optim import cosine_schedule, make_optimizer
from msdd.train.stage1 import Stage1Trainer

from conftest import assert_same_weights, random_vgg16_file, tiny_config


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "log.jsonl")]


@pytest.mark.slow
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


def test_a_time_budget_ends_the_run_as_a_finished_one(tmp_path):
    """fit(minutes=...) (`--minutes` of `msdd train`, `distill` and `gen-train`): the step under way when the time is
    up is the last, and the run ends as a finished one (its checkpoint and its model), not as an interrupted one.
    Fitting the finished run again trains nothing and does not warn that it is past max_steps (it is at it)."""
    import warnings

    run = tmp_path / "r"
    trainer = Stage1Trainer(tiny_config(), run)
    summary = trainer.fit(max_steps=50, minutes=1e-6, progress=False)
    assert summary["steps"] == 1 and summary["interrupted"] is None and (run / "model").is_dir()
    _assert_saved_stage1_model(trainer, run / "model")
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = Stage1Trainer(tiny_config(), run).fit(max_steps=1, progress=False)
    assert again["steps"] == 1 and not [w for w in caught if "past max_steps" in str(w.message)]


def _assert_saved_stage1_model(trainer: Stage1Trainer, model: Path) -> None:
    """The saved model is the trainer's EMA tokenizer, with stage 1's record and the latent statistics of 512
    training crops drawn from train.seed + 7."""
    from msdd.data import build_train_dataset
    from msdd.train.stage1 import compute_latent_stats

    saved, ema, cfg = Tokenizer.from_pretrained(model), trainer.ema.module, trainer.cfg
    assert {k: saved.metadata[k] for k in ("stage", "steps_trained")} == {"stage": 1, "steps_trained": trainer.step}
    assert saved.config == ema.config
    assert_same_weights(saved, ema)
    mean, std = compute_latent_stats(ema, build_train_dataset(cfg.data.source, cfg.model.image_size,
                                                              seed=cfg.train.seed + 7, limit=512))
    assert torch.equal(saved.latent_mean, mean) and torch.equal(saved.latent_std, std)
    assert not torch.equal(mean, torch.zeros_like(mean)) and not torch.equal(std, torch.ones_like(std))


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


def test_stage_1_with_lpips_trains_on_the_vgg16_file_it_is_given(tmp_path):
    """model.flow.lpips_weight > 0: the trainer builds LPIPS from `vgg_weights` (here random features: a network that
    runs offline) and adds it to the last stage's loss; the same run without it has the same earlier stages' losses."""
    vgg = random_vgg16_file(tmp_path / "vgg16.pth")
    logs = {}
    for weight in (0.0, 0.5):
        cfg = tiny_config(f"model.flow.lpips_weight={weight}", "train.log_every=1")
        trainer = Stage1Trainer(cfg, tmp_path / str(weight), vgg_weights=vgg if weight else None)
        trainer.fit(max_steps=1, progress=False)
        logs[weight] = json.loads((tmp_path / str(weight) / "log.jsonl").read_text())
    assert torch.equal(trainer.perceptual.features[0].weight, torch.load(vgg, weights_only=True)["features.0.weight"])
    without, with_lpips = logs[0.0], logs[0.5]
    assert (with_lpips["loss_stage0"], with_lpips["loss_stage1"]) == (without["loss_stage0"], without["loss_stage1"])
    assert with_lpips["loss_stage2"] > without["loss_stage2"] + 1e-4


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


def test_the_optimiser_is_pytorchs_fused_adamw_with_the_reference_update():
    """make_optimizer runs PyTorch's fused AdamW on the CPU (its per-tensor default was a large part of a tiny-64
    step: benchmarks/README.md): the same update as the reference per-tensor AdamW to float rounding, over three
    steps, for both parameter groups (the linear path's at its own lr) with weight decay."""
    g = torch.Generator().manual_seed(0)
    mine = [torch.nn.Parameter(torch.randn(64, 32, generator=g)), torch.nn.Parameter(torch.randn(32, generator=g))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    start = [p.detach().clone() for p in mine]
    opt = make_optimizer(mine, 1e-2, (0.9, 0.95), 0.05, slow=mine[1:], slow_scale=0.1)
    reference = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:], "lr": 1e-3}], lr=1e-2, betas=(0.9, 0.95),
                                  weight_decay=0.05, foreach=False)
    assert [group["fused"] for group in opt.param_groups] == [True, True]
    for _ in range(3):
        for p, q in zip(mine, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        reference.step()
    for p, q, p0 in zip(mine, ref, start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert (p - p0).abs().max() > 1e-3  # they did move


def test_a_cpu_training_steps_attention_computes_in_float32_up_to_its_key_limit(monkeypatch):
    """Under bf16 autocast with gradients on, the CPU attention runs PyTorch's SDPA in float32 (faster there than its
    bf16 flash attention up to FP32_CPU_ATTENTION_MAX_KEYS keys: benchmarks/README.md, "Training step") and rounds
    the output to bf16, the dtype the bf16 attention gives, compiled (`train.compile`) or not; gradients flow back
    through it. Above the limit, and without gradients, the attention is bf16's as before."""
    import torch.nn.functional as F

    from msdd.models import layers

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g).requires_grad_(True) for _ in range(3))
    angles = torch.rand(40, 16, generator=g)
    rope = (angles.cos(), angles.sin())
    rq, rk = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)

    def attend():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layers.attention(q, k, v, rope)

    def bf16_attention():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(rq, rk, v).transpose(1, 2).flatten(2)

    with torch.no_grad(), layers.unoptimised():
        assert torch.equal(attend(), bf16_attention())  # no gradients: as before
    out = attend()
    expected = F.scaled_dot_product_attention(rq.float(), rk.float(), v.float()).transpose(1, 2).flatten(2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.to(torch.bfloat16))
    assert not torch.equal(out, bf16_attention())
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)  # train.compile: the same inside a graph
    assert torch.equal(compiled(), expected.to(torch.bfloat16))
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    monkeypatch.setattr(layers, "FP32_CPU_ATTENTION_MAX_KEYS", 39)
    assert torch.equal(attend(), bf16_attention())


@pytest.mark.slow
def test_train_compile_runs_the_trained_models_blocks_compiled_with_the_eager_loss_and_gradients(tmp_path,
                                                                                                monkeypatch):
    """train.compile: every transformer block of the trained tokenizer runs compiled (graphs per block form and input
    shape: the decoder's passes at each stage's resolution), the EMA's blocks do not (grids and the saved model decode
    on the inference path), and a compiled step gives the eager step's loss and gradients. The backend here is aot_eager
    (dynamo's and autograd's tracing of the blocks, the float32 attention included, without inductor's minutes of
    code generation); the trainer passes its device and nothing else. The step time that sizes budgets and
    `msdd info --step-time` prints is the compiled step's too."""
    import msdd.train.stage1 as stage1
    from msdd.models import compiling
    from msdd.models.layers import JointBlock

    graphs, models = [], []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    backend = counting

    def compile_blocks(model, device):
        models.append(model)
        return compiling.compile_blocks(model, device, backend=backend)

    monkeypatch.setattr(stage1, "compile_blocks", compile_blocks)
    cfg = tiny_config("train.batch_size=8", "model.linear_path=false")
    eager = Stage1Trainer(cfg, tmp_path / "eager")
    compiled = Stage1Trainer(tiny_config("train.batch_size=8", "model.linear_path=false", "train.compile=true"),
                             tmp_path / "compiled")
    g = torch.Generator().manual_seed(3)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in eager.tok.state_dict().items()}  # no zero-initialised layer left: every block has a gradient
    images = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    losses, grads = [], []
    for trainer in (eager, compiled):
        trainer.tok.load_state_dict(weights)
        loss, _ = trainer.micro_step(images, torch.Generator().manual_seed(5))
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in trainer.trained_parameters()])
    blocks = [m for m in compiled.tok.modules() if isinstance(m, JointBlock)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)  # what nn.Module.compile sets
    assert len(graphs) >= len(blocks)  # traced: 1 encoder and 2 decoder block forms, the latter at 3 resolutions
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in compiled.ema.module.modules())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert all(p.grad.abs().sum() > 0 for n, p in compiled.tok.named_parameters() if n.endswith("w12.weight"))
    for ge, gc in zip(*grads):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    assert models == [compiled.tok]
    # `msdd info --step-time` and --minutes budgets time the step as configured, on a model compiled the same way.
    # Timing both dtypes in one process doubles the variants of the block's forward (with two encoder blocks: 10,
    # more than dynamo's default limit of 8, past which the blocks would run eager; here a hit fails)
    backend = "eager"  # dynamo alone (the limit is dynamo's): faster than aot_eager
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # torch's patch: monkeypatch would delete it
        for bf16 in (True, False):
            cfg = tiny_config("train.batch_size=8", "model.linear_path=false", "train.compile=true",
                              f"train.bf16={str(bf16).lower()}", "model.encoder.depth=2")
            assert stage1.measure_step_time(cfg, steps=1, warmup=1) > 0
    assert len(models) == 3


def test_accumulated_micro_batches_step_with_the_image_weighted_mean_gradient(tmp_path):
    """train.grad_accum: one optimiser step over several micro-batches steps with the mean gradient over their
    images, each micro-batch's gradient weighted by how many usable images it holds (here a full one of 4 and one
    of 2, as skipped files leave it). Checked against each micro-batch's gradient taken alone with the noise
    generator of its slot; the logged loss is the same weighted mean. (A huge grad_clip leaves the gradients as they
    are; `_step` is the loop's step on micro-batches as `fit` draws them, without a data stream.)"""
    cfg = tiny_config("train.batch_size=8", "train.grad_accum=2", "train.grad_clip=1e9", "model.linear_path=false")
    trainer = Stage1Trainer(cfg, tmp_path / "r")
    params = trainer.trained_parameters()
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(n, 3, 32, 32, generator=g) * 2 - 1 for n in (4, 2)]
    alone, losses = [], []
    for a, images in enumerate(batches):
        for p in params:
            p.grad = None
        loss, _ = trainer.micro_step(images, trainer.generator(a))
        loss.backward()
        losses.append(loss.item())
        alone.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
    out, info = trainer._step(batches)
    assert info["images"] == 6 and out["loss"] == pytest.approx((4 * losses[0] + 2 * losses[1]) / 6, rel=1e-6)
    for p, ga, gb in zip(params, *alone):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, (4 * ga + 2 * gb) / 6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warmup", [True, False])
def test_each_step_moves_the_ema_towards_the_new_weights_by_its_decay(tmp_path, warmup):
    """After every optimiser step the EMA moves towards the trained weights by 1 - d: d = train.ema_decay with
    train.ema_warmup=false, the ramp's min(ema_decay, 2 / 11) on the first update with it (the trainer passes both
    settings on, and updates its EMA in the step)."""
    cfg = tiny_config("train.batch_size=4", "train.ema_decay=0.9", f"train.ema_warmup={str(warmup).lower()}",
                      "model.linear_path=false")
    trainer = Stage1Trainer(cfg, tmp_path / "r")
    before = {k: v.clone() for k, v in trainer.ema.module.named_parameters()}
    trainer.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    d = 2 / 11 if warmup else 0.9
    new, ema = dict(trainer.tok.named_parameters()), dict(trainer.ema.module.named_parameters())
    moved = [n for n in new if not torch.equal(new[n], before[n])]
    assert moved  # the zero-initialised output layers: the first step moves only the final layer
    for n in moved:
        torch.testing.assert_close(ema[n], before[n] + (1 - d) * (new[n] - before[n]), msg=n)


def test_the_ema_is_a_frozen_copy_that_averages_trained_weights_and_copies_the_rest():
    """EMA keeps its own frozen copy in eval mode (no gradients reach it, dropout and batch statistics are off when it
    decodes), averages only the parameters that are trained, takes a frozen parameter as it started, and copies the
    buffers (BatchNorm's running statistics) as they are."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    ema = EMA(model, 0.5, warmup=False)
    assert not ema.module.training and model.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    got, new = ema.module.state_dict(), model.state_dict()
    for k in ("0.weight", "1.weight", "1.bias"):
        torch.testing.assert_close(got[k], start[k] + 0.5, msg=k)
    torch.testing.assert_close(got["0.bias"], start["0.bias"])  # frozen: not averaged
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(got[k], new[k]), k
    assert got["1.running_mean"].data_ptr() != new["1.running_mean"].data_ptr()  # a copy, not the model's buffer


def test_stage1_lr_decays_to_min_lr_ratio_at_max_steps(tmp_path):
    """train.min_lr_ratio and train.max_steps shape the stage-1 schedule: with no warm-up and max_steps=2 the lr
    after the first step is half-way down the cosine (0.3 + 0.7 / 2 = 0.65 of lr), from the second on it is
    lr * min_lr_ratio."""
    cfg = tiny_config("train.batch_size=4", "train.warmup_steps=0", "train.max_steps=2", "train.min_lr_ratio=0.3",
                      "model.linear_path=false")
    trainer = Stage1Trainer(cfg, tmp_path / "r")
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    lrs = [trainer.train_step(images)["lr"] / cfg.train.lr for _ in range(3)]
    assert lrs == pytest.approx([0.65, 0.3, 0.3])


def test_train_seed_draws_the_initial_weights(tmp_path):
    """train.seed seeds the initial weights: the same seed gives the same model, another seed another one (whatever
    the global RNG held before)."""
    def init(seed, name):
        torch.manual_seed(1234 + len(name))
        cfg = tiny_config(f"train.seed={seed}", "model.linear_path=false")
        return Stage1Trainer(cfg, tmp_path / name).tok.state_dict()

    a, again, other = init(3, "a"), init(3, "again"), init(4, "other")
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_log_checkpoint_and_grid_cadence_and_what_a_log_line_holds(tmp_path, photo_folder):
    """train.log_every / ckpt_every / grid_every count optimiser steps: 6 steps with 3 / 2 / 4 log steps 3 and 6,
    keep checkpoints of steps 2, 4 and 6 and draw grids at step 4 and at the end. A log line holds the step's loss
    and its part per stage, the gradient norm, the lr of the schedule (warm-up: (3 + 1) / 5 of it after 3 steps),
    the throughput and the skipped images; the final model records the steps it was trained for."""
    cfg = tiny_config(f"data.source={photo_folder}", f"data.eval_source={photo_folder}", "train.batch_size=4",
                      "train.log_every=3", "train.ckpt_every=2", "train.grid_every=4", "model.linear_path=false")
    run = tmp_path / "r"
    Stage1Trainer(cfg, run).fit(max_steps=6, progress=False)
    lines = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in lines] == [3, 6]
    assert set(lines[0]) == {"step", "loss", "loss_stage0", "loss_stage1", "loss_stage2", "grad_norm", "lr",
                             "img_per_s", "skipped_images"}
    assert lines[0]["lr"] == pytest.approx(cfg.train.lr * 4 / 5) and lines[0]["skipped_images"] == 0
    assert all(r["img_per_s"] > 0 and r["grad_norm"] > 0 for r in lines)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == ["step_00000004.png", "step_00000006.png"]
    assert json.loads((run / "model" / "config.json").read_text())["steps_trained"] == 6


def test_a_time_budget_sizes_the_schedule_to_fit_it():
    """budgeted_config (`msdd demo --minutes`, `msdd fidelity`): train.max_steps from a measured step time fills 95 %
    of the budget (here 0.2 minutes = 12 s), the warm-up is a tenth of it at most, checkpoints and grids are
    scaled to it, so that the LR schedule completes within the budget. fixed_steps, the demo's schedule: 900 and 250
    steps with warm-up, checkpoints and grids scaled the same way."""
    cfg = tiny_config("train.batch_size=4", "train.warmup_steps=100000", "distill.warmup_steps=100000",
                      "model.linear_path=false")
    budgeted, step_s = budgeted_config(cfg, 0.2, "cpu")
    t = budgeted.train
    assert t.max_steps > 10 and t.max_steps * step_s <= 0.95 * 12 < (t.max_steps + 1) * step_s, (t.max_steps, step_s)
    assert (t.warmup_steps, t.ckpt_every, t.grid_every) == (t.max_steps // 10, max(50, t.max_steps // 10),
                                                            max(50, t.max_steps // 5))
    fixed = fixed_steps(cfg)
    assert (fixed.train.max_steps, fixed.train.warmup_steps, fixed.train.ckpt_every, fixed.train.grid_every) == \
        (900, 90, 150, 225)
    assert (fixed.distill.max_steps, fixed.distill.warmup_steps, fixed.distill.ckpt_every, fixed.distill.grid_every) \
        == (250, 25, 50, 125)


def test_stage1_resumes_whatever_the_distill_section_says(tmp_path, photo_folder):
    """One list of --set serves both stages' commands: a stage-1 run continues when only distill.* fields (which
    stage 1 never reads) changed, while a train.* change is still refused."""
    base = [f"data.source={photo_folder}", f"data.eval_source={photo_folder}", "train.batch_size=4",
            "model.linear_path=false"]
    Stage1Trainer(tiny_config(*base), tmp_path / "r").fit(max_steps=1, progress=False)
    assert Stage1Trainer(tiny_config(*base, "distill.lr=5e-4", "distill.max_steps=7"), tmp_path / "r").step == 1
    with pytest.raises(ValueError, match=r"train\.lr"):
        Stage1Trainer(tiny_config(*base, "train.lr=5e-4"), tmp_path / "r")


def test_every_epoch_has_its_own_order():
    """The training order is reshuffled every epoch (drawn from the seed and the epoch), and each epoch's order holds
    every index at most once; the same seed and epoch give the same order (what resuming relies on)."""
    from msdd.train.stream import ResumableSampler

    sampler = ResumableSampler(12, seed=5, batch=4)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(sampler.order())
    assert all(len(o) == len(set(o)) == 12 for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    again = ResumableSampler(12, seed=5, batch=4)
    again.set_epoch(1)
    assert again.order() == orders[1]
