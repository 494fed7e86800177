"""`msdd train`, `distill`, `demo` and `fidelity`: the commands that train models."""

from __future__ import annotations

import warnings

from msdd.cli.common import (add_config_args, device_arg, finish_training, folder_arg, positive_float, positive_int,
                              removed_if_left_empty)


def load_training_config(args):
    """The config of `msdd train` / `msdd distill`; a bad argument is a ValueError (`main` exits 2)."""
    from msdd.config import load_config

    extra = [f"data.limit={args.limit}"] if args.limit is not None else []
    if getattr(args, "init_from", None):
        extra.append(f"train.init_from={args.init_from}")
    return load_config(args.preset, [*args.overrides, *extra])


def cmd_train(args) -> int:
    from msdd.train.stage1 import Stage1Trainer

    folder_arg(args.run_dir, "--run-dir")
    with removed_if_left_empty(args.run_dir):
        trainer = Stage1Trainer(load_training_config(args), args.run_dir, device=args.device,
                                require_resume=args.resume, vgg_weights=args.vgg_weights,
                                dinov2_weights=args.dinov2_weights)
        summary = trainer.fit(max_steps=args.max_steps, minutes=args.minutes)
    return finish_training(trainer, summary, "model")


def cmd_distill(args) -> int:
    from msdd.train.distill import build_distiller

    folder_arg(args.run_dir, "--run-dir")
    config = load_training_config(args)
    _check_student_model(config, args)
    _check_read_by_distillation(config, args)
    with removed_if_left_empty(args.run_dir):
        distiller = build_distiller(config, args.teacher, args.run_dir, device=args.device,
                                    vgg_weights=args.vgg_weights, dino_weights=args.dino_weights,
                                    require_resume=args.resume)
        summary = distiller.fit(max_steps=args.max_steps, minutes=args.minutes)
    return finish_training(distiller, summary, "one-step student")


def _check_student_model(config, args) -> None:
    """A distillation's student has its teacher's architecture: `--set model.*` that makes the model section differ
    from the preset's must give the teacher's, or it would be replaced without a word."""
    from dataclasses import replace

    from msdd.config import load_config, model_config_from_dict
    from msdd.hub import read_model_metadata, resolve_model_dir

    if config.model == load_config(args.preset).model:
        return
    teacher = model_config_from_dict(read_model_metadata(resolve_model_dir(args.teacher))["model"])
    if replace(config.model, one_step=teacher.one_step) != teacher:  # a student as teacher: the distiller says so
        raise ValueError(f"--set changes model fields, but the student has the architecture of its teacher "
                         f"({args.teacher}), which differs: drop the model.* options (the model section is the "
                         "teacher's)")


def _check_read_by_distillation(config, args) -> None:
    """`--set` of a field the distillation does not read is ignored: a warning naming it (a warning, not an error:
    one list of --set serves both stages' commands). train.* fields that only stage 1 reads (its steps, lr, batch),
    with the distill.* field to set instead; with an SSDD teacher, the multi-scale distiller's adversarial and
    guidance settings."""
    from msdd.config import load_config
    from msdd.config.dicts import diff_fields
    from msdd.train.distill_ssdd import NOT_READ
    from msdd.train.distiller import READ_ANY_TIME, READS, teacher_family

    changed = [d.split(":", 1)[0] for d in diff_fields(load_config(args.preset), config)]
    read = [r for r in READS + READ_ANY_TIME if r.startswith("train.")]
    unread = [name for name in changed if name.startswith("train.") and name not in read]
    if unread:
        named = [f"{n} (set distill.{n[6:]} instead)" if hasattr(config.distill, n[6:]) else f"{n} (drop it)"
                 for n in unread]
        warnings.warn(f"--set {', '.join(named)}: stage 1's settings, which a distillation does not read (ignored). "
                      f"The train fields a distillation reads: {', '.join(read)}", stacklevel=2)
    adversarial = [name for name in changed if name in NOT_READ]
    try:
        ssdd = bool(adversarial) and teacher_family(args.teacher) == "ssdd"
    except (OSError, ValueError):  # no such teacher: the distiller says so
        ssdd = False
    if ssdd:
        warnings.warn(f"--set {', '.join(adversarial)}: settings of the multi-scale distiller's discriminator and "
                      "guidance, which an SSDD teacher's GAN-free distillation does not read (ignored); its teacher "
                      "decodes with its own model.ssdd.steps", stacklevel=2)


def cmd_demo(args) -> None:
    from msdd.demo import run_demo

    folder_arg(args.out, "--out")
    run_demo(args.out, minutes=args.minutes, preset=args.preset, overrides=tuple(args.overrides), device=args.device)


def cmd_fidelity(args) -> None:
    from msdd.eval.fidelity import Fidelity

    if args.out is None:  # a toy table never lands on the published one
        args.out = "msdd-fidelity-quick" if args.quick else "benchmarks/fidelity/latest"
    folder_arg(args.out, "--out")
    if args.quick and args.seeds is not None:
        raise ValueError("--quick runs one seed per configuration: drop --seeds, or drop --quick to run several")
    Fidelity(args.out, args.minutes, preset=args.preset, overrides=tuple(args.overrides), seeds=args.seeds or 2,
             total_steps=args.total_steps, quick=args.quick, device=args.device,
             ssdd_overrides=tuple(args.ssdd_overrides), train_steps=args.train_steps,
             distill_steps=args.distill_steps).run()


def add_train(sub) -> None:
    p = sub.add_parser("train", help="stage 1: train a tokenizer (encoder + decoder of the config's family)",
                       description="Stage 1. Also runs under torchrun / srun: train.batch_size is the global batch, "
                                   "split over the processes and train.grad_accum micro-batches. SIGTERM / SIGINT "
                                   "write a checkpoint and exit; the same command continues the run.")
    add_config_args(p)
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop at this step (default: train.max_steps)")
    p.add_argument("--minutes", type=positive_float, default=None, help="also stop after this much wall time")
    p.add_argument("--limit", type=positive_int, default=None, help="use only N training images per epoch (data.limit)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="fine-tune: start from this trained model (directory, bundled name such as tiny-64-teacher, "
                        "or HF repo id) instead of random weights (train.init_from)")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for the LPIPS loss (vgg16-397923af.pth)")
    p.add_argument("--dinov2-weights", default=None,
                   help="DINOv2 ViT-S/14 weights file for the REPA loss of SSDD models (dinov2_vits14_pretrain.pth)")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    p.set_defaults(func=cmd_train)


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="stage 2: distil a stage-1 model into a one-step-per-stage student",
                       description="Stage 2. Runs under torchrun / srun like `msdd train` (distill.batch_size is "
                                   "global, distill.grad_accum micro-batches). An msdd teacher is distilled into a "
                                   "one-step-per-stage student (discriminator, SPEC 7); an SSDD teacher into a "
                                   "single-step student without GAN (SPEC 10).")
    add_config_args(p)
    p.add_argument("--teacher", required=True, help="stage-1 model directory (e.g. runs/x/model)")
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop at this step (default: distill.max_steps)")
    p.add_argument("--minutes", type=positive_float, default=None, help="also stop after this much wall time")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--dino-weights", default=None, help="DINO ViT-S/16 weights file (dino_deitsmall16_pretrain.pth)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only N training images per epoch (data.limit)")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    p.set_defaults(func=cmd_distill)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny preset on the embedded photos, evaluate, write a report")
    add_config_args(p)
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="size both stages to this wall-time budget from a measured step time instead of the fixed "
                        "step counts (the model then depends on the machine's speed)")
    p.add_argument("--out", default="msdd-demo", help="output folder (default: msdd-demo)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.set_defaults(func=cmd_demo)


def add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="the paper's Tables 2-3 / Figure 4 in miniature on the embedded photos")
    add_config_args(p)
    p.add_argument("--minutes", type=positive_float, default=120.0, help="total training budget (default 120)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per configuration (default 2; --quick: 1)")
    p.add_argument("--total-steps", type=positive_int, default=40, help="Euler steps every teacher shares (default 40)")
    p.add_argument("--train-steps", type=positive_int, default=None,
                   help="fixed stage-1 steps per job instead of sizing them from --minutes "
                   "(same models on any machine)")
    p.add_argument("--distill-steps", type=positive_int, default=None, help="fixed distillation steps per student")
    p.add_argument("--ssdd-set", dest="ssdd_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the SSDD preset (repeatable)")
    p.add_argument("--quick", action="store_true", help="a 32 px toy model and 1 seed: about a minute, same table")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/fidelity/latest, the published "
                                               "table's; with --quick: msdd-fidelity-quick)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.set_defaults(func=cmd_fidelity)
