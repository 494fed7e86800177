"""`msdd` command line. Run `msdd <command> --help` for the options of each command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser, default_preset: str = "tiny-64") -> None:
    from msdd.config import preset_names

    p.add_argument("--preset", default=default_preset,
                   help=f"preset name ({', '.join(preset_names())}) or a YAML file (default: {default_preset})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set decoder.depth=4 --set train.lr=1e-4 (repeatable)")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=str, default=None,
                   help="Euler steps per stage: one int for all stages or a comma list, e.g. 30,30,30,30 "
                        "(default: the model's own schedule)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoding noise (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for encode/decode")
    p.add_argument("--batch-size", type=int, default=32)


def _parse_steps(text: str | None):
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --steps {text!r}: expected an int or a comma list of ints, e.g. 10 or 30,30,30,30")
    return values[0] if len(values) == 1 else values


def _folder_arg(path: str | Path, flag: str) -> Path:
    """A folder argument (--out, --run-dir) checked before any work: a file in its place (or in place of one
    of its parent folders) is an error naming the option, not an OSError traceback after loading a model."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "" if q == p else f" ({q} is a file)"
                raise ValueError(f"{flag} {path} is an existing file, not a folder{what}; pass a folder "
                                 "(it is created if missing)")
            break
    return p


def _finish_training(trainer, summary: dict, what: str) -> int:
    """Print the summary (rank 0), end the process group; exit code 128 + signal when interrupted."""
    import signal

    from msdd.dist import cleanup

    if trainer.dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": summary["last"]}, indent=2))
        if not summary["interrupted"]:
            print(f"{what} written to {trainer.run_dir / 'model'}")
    cleanup()
    stop = summary["interrupted"]
    if not stop:
        return 0
    return 128 + signal.Signals[stop] if stop in signal.Signals.__members__ else 1


def _load_training_config(args):
    """The config of `msdd train` / `msdd distill`; a bad argument is a ValueError (`main` exits 2)."""
    from msdd.config import load_config

    if args.max_steps is not None and args.max_steps < 1:  # 0 or below: no step, yet a "finished" model
        raise ValueError(f"--max-steps {args.max_steps}: must be >= 1 (the step to stop at); leave it out to use "
                         "the config's max_steps")
    extra = [f"data.limit={args.limit}"] if args.limit is not None else []
    if getattr(args, "init_from", None):
        extra.append(f"train.init_from={args.init_from}")
    return load_config(args.preset, [*args.overrides, *extra])


def cmd_train(args) -> int:
    from msdd.train.stage1 import Stage1Trainer

    _folder_arg(args.run_dir, "--run-dir")
    trainer = Stage1Trainer(_load_training_config(args), args.run_dir, device=args.device, require_resume=args.resume,
                            vgg_weights=args.vgg_weights, dinov2_weights=args.dinov2_weights)
    return _finish_training(trainer, trainer.fit(max_steps=args.max_steps, minutes=args.minutes), "model")


def cmd_distill(args) -> int:
    from msdd.train.distill import build_distiller

    _folder_arg(args.run_dir, "--run-dir")
    distiller = build_distiller(_load_training_config(args), args.teacher, args.run_dir, device=args.device,
                                vgg_weights=args.vgg_weights, dino_weights=args.dino_weights,
                                require_resume=args.resume)
    summary = distiller.fit(max_steps=args.max_steps, minutes=args.minutes)
    return _finish_training(distiller, summary, "one-step student")


def cmd_reconstruct(args) -> None:
    from msdd.eval.reconstruct import collect_inputs, reconstruct_images, write_reconstructions
    from msdd.tokenizer import Tokenizer

    steps = _parse_steps(args.steps)
    _folder_arg(args.out, "--out")
    tok = Tokenizer.from_pretrained(args.model, device=args.device)
    images, names, skipped = collect_inputs(args.inputs, tok.config.image_size, exclude=[args.out])
    # each image's noise is seeded from --seed and its output name: independent of --batch-size and the other inputs
    recon, decode_s = reconstruct_images(tok, images, steps, args.cfg, args.seed, args.batch_size, args.bf16,
                                         keys=names)
    summary = write_reconstructions(args.out, names, images, recon)
    print(f"{summary['n']} images reconstructed ({len(skipped)} skipped) -> {args.out}: mean PSNR "
          f"{summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, decode {decode_s:.3f} s/image")


def cmd_eval(args) -> None:
    import warnings

    from msdd.dist import cleanup, init_distributed
    from msdd.eval.evaluate import evaluate
    from msdd.eval.plots import plot_pareto
    from msdd.hub import resolve_model_dir
    from msdd.tokenizer import Tokenizer

    info = init_distributed(args.device)
    device = f"cuda:{info.local_rank}" if args.device == "cuda" else args.device
    runs = []  # (label, model dir, steps)
    for path in [args.model, *args.compare]:
        path = resolve_model_dir(path)  # a folder, a bundled name (default: the bundled student) or a Hub id
        tok = Tokenizer.from_pretrained(path, device=device)
        sweep = [_parse_steps(s) for s in args.sweep_steps.split(";")] if args.sweep_steps and not tok.config.one_step \
            else [_parse_steps(args.steps)]
        for steps in sweep:
            runs.append((path, tok, steps))
    results = []
    for path, tok, steps in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if not info.is_main else "default")
            r = evaluate(tok, args.data, steps=steps, cfg=args.cfg, seed=args.seed, bf16=args.bf16,
                         batch_size=args.batch_size, limit=args.limit, inception_weights=args.inception_weights,
                         vgg_weights=args.vgg_weights, dist_info=info, model_path=path,
                         pca_source=None if args.pca_source == "none" else args.pca_source)
        p = r["protocol"]
        r["label"] = f"{'student' if tok.config.one_step else 'teacher'} {p['steps_per_stage']} cfg {p['cfg']:g}"
        r["model"] = str(path)
        results.append(r)
        if info.is_main:
            m = r["metrics"]
            extra = "".join(f", {k} {m[k]:.4f}" for k in ("lpips", "rfid") if k in m)
            print(f"{r['label']}: {p['images']} images, PSNR {m['psnr']:.3f} dB, SSIM {m['ssim']:.4f}{extra}, "
                  f"decode {r['img_per_s']:.2f} img/s")
            for b in r["baselines"].values():
                print(f"  baseline {b['method']} ({b['floats']} floats): PSNR {b['psnr']:.3f} dB, SSIM {b['ssim']:.4f}")
            for k, why in r["skipped_metrics"].items():
                print(f"  skipped {k}: {why}")
            for w in r["warnings"]:
                print(f"  WARNING: {w}")
    if info.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")
        print(f"results -> {args.out}")
        if args.plot:
            points = [{"label": r["label"], "img_per_s": r["img_per_s"], "psnr": r["metrics"]["psnr"],
                       "rfid": r["metrics"].get("rfid")} for r in results]
            title = f"{args.data}, {results[0]['protocol']['device']}, {results[0]['protocol']['dtype']}"
            print(f"plot -> {plot_pareto(points, args.plot, title=title)}")
    cleanup()


def cmd_info(args) -> None:
    import torch

    from msdd.config import load_config
    from msdd.eval.flops import decode_flops, decoder_pass_flops, encoder_flops
    from msdd.tokenizer import Tokenizer

    if args.step_time < 0:
        raise SystemExit(f"msdd info: --step-time takes a number of rounds >= 1, got {args.step_time}")
    if args.model and args.step_time:
        raise SystemExit("msdd info: --step-time measures a preset's training step; pass --preset/--set, not --model")
    if args.model:
        tok = Tokenizer.from_pretrained(args.model)
        cfg = tok.config
    else:
        full = load_config(args.preset, args.overrides)
        cfg = full.model
        with torch.device("meta"):  # shapes only: counting parameters and FLOPs costs no compute
            tok = Tokenizer(cfg)
    n_enc = sum(p.numel() for p in tok.encoder.parameters())
    n_dec = sum(p.numel() for p in tok.decoder.parameters())
    passes = decoder_pass_flops(tok)
    steps = tok.default_steps()
    if cfg.family != "msdd":
        info = _family_info(cfg, tok, n_enc, n_dec, passes, steps, encoder_flops(tok))
        if args.step_time:
            info["train_step"] = _step_times(full, args.step_time)
        print(json.dumps(info, indent=2))
        return
    info = {
        "image_size": cfg.image_size, "latent": [cfg.latent_tokens, cfg.latent_dim],
        "compression": cfg.compression, "one_step": cfg.one_step,
        "params_encoder_M": round(n_enc / 1e6, 3), "params_decoder_M": round(n_dec / 1e6, 3),
        "stages": [
            {"stage": w.index, "resolution": w.resolution, "image_tokens": (w.resolution // cfg.decoder.patch_size) ** 2,
             "t": [round(w.t_start, 4), round(w.t_end, 4)], "tau": [round(w.tau_start, 4), round(w.tau_end, 4)],
             "alpha": round(w.alpha, 4), "beta": round(w.beta, 4), "gflop_per_pass": round(f / 1e9, 3)}
            for w, f in zip(tok.windows, passes)
        ],
        "encoder_gflop_per_image": round(encoder_flops(tok) / 1e9, 3),
        "decode": {"steps_per_stage": list(steps), "cfg": cfg.sampling.cfg,
                   "gflop_per_image": round(decode_flops(tok, steps, cfg.sampling.cfg) / 1e9, 3),
                   "one_step_gflop_per_image": round(sum(passes) / 1e9, 3)},
    }
    if args.step_time:
        info["train_step"] = _step_times(full, args.step_time)
    print(json.dumps(info, indent=2))


def _step_times(cfg, rounds: int) -> dict:
    """Stage-1 training step time of `cfg` in fp32 and with bf16 autocast, measured side by side:
    `rounds` alternating rounds of 5 timed steps each, median over rounds."""
    import statistics
    from dataclasses import replace

    from msdd.train.stage1 import measure_step_time

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, bf16 in (("fp32", False), ("bf16", True)):
            times[name].append(measure_step_time(replace(cfg, train=replace(cfg.train, bf16=bf16))))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "batch_size": cfg.train.batch_size, "rounds": rounds,
        **{f"{name}_s_per_step": round(m, 4) for name, m in med.items()},
        **{f"{name}_steps_per_s": round(1 / m, 3) for name, m in med.items()},
        "bf16_speedup": round(med["fp32"] / med["bf16"], 3),
    }


def _family_info(cfg, tok, n_enc: int, n_dec: int, passes: list[int], steps: tuple[int, ...], enc_flops: int) -> dict:
    """`msdd info` for the ssdd and plain families: one stage at full resolution."""
    from msdd.flow.ssdd import time_schedule

    info = {
        "family": cfg.family, "image_size": cfg.image_size, "latent": list(cfg.latent_shape),
        "compression": cfg.compression, "one_step": cfg.one_step,
        "params_encoder_M": round(n_enc / 1e6, 3), "params_decoder_M": round(n_dec / 1e6, 3),
        "encoder_gflop_per_image": round(enc_flops / 1e9, 3),
        "gflop_per_pass": round(passes[0] / 1e9, 3),
    }
    if cfg.family == "plain":
        info["decode"] = {"passes": 1, "gflop_per_image": round(passes[0] / 1e9, 3)}
        return info
    s = cfg.ssdd
    info["ssdd"] = {"latent_kind": s.latent_kind, "base_channels": s.base_channels,
                    "channel_mults": list(s.channel_mults), "blocks_per_level": s.blocks_per_level,
                    "bottleneck_grid": cfg.image_size // 2 ** (len(s.channel_mults) - 1),
                    "mid_depth": s.mid_depth, "mid_width": s.width, "mid_heads": s.mid_heads}
    info["decode"] = {"steps": steps[0], "schedule_t": [round(t, 4) for t in time_schedule(steps[0], s.shift)],
                      "gflop_per_image": round(steps[0] * passes[0] / 1e9, 3),
                      "one_step_gflop_per_image": round(passes[0] / 1e9, 3),
                      "teacher_steps": s.steps, "teacher_gflop_per_image": round(s.steps * passes[0] / 1e9, 3)}
    return info


def cmd_latent_stats(args) -> None:
    import torch

    from msdd.data import build_train_dataset
    from msdd.hub import BUNDLED, resolve_model_dir, save_tokenizer, stored_dtype
    from msdd.train.stage1 import compute_latent_stats
    from msdd.tokenizer import Tokenizer

    local = args.model not in BUNDLED and Path(args.model).expanduser().is_dir()
    if args.out is None and not local:
        what = "a bundled model (part of the installed package)" if args.model in BUNDLED else "not a local directory"
        raise ValueError(f"--model {args.model} is {what}, so it is not rewritten: pass --out DIR, the model "
                         "directory to write with the new statistics")
    out = _folder_arg(args.out if args.out is not None else args.model, "--out")
    source = resolve_model_dir(args.model)
    dtype = stored_dtype(source)  # kept: an fp16 model stays fp16, wherever it is written
    tok = Tokenizer.from_pretrained(source, device=args.device)
    dataset = build_train_dataset(args.data, tok.config.image_size, seed=0)
    mean, std = compute_latent_stats(tok, dataset, max_images=args.max_images)
    tok.latent_mean.copy_(mean)
    tok.latent_std.copy_(std)
    extra = {k: v for k, v in tok.metadata.items() if k not in ("format", "format_version", "model")}
    save_tokenizer(tok, out, dtype=dtype, **extra)
    print(json.dumps({"mean": [round(v, 5) for v in mean.tolist()], "std": [round(v, 5) for v in std.tolist()]}))
    stored = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    print(f"wrote {out} (latent statistics of {args.data}; weights stored as {stored}, as in {source})")


def cmd_export(args) -> None:
    from msdd.hub import export_tokenizer

    _folder_arg(args.out, "--out")
    out = export_tokenizer(args.model, args.out, args.dtype)
    print(f"wrote {out} ({args.dtype} weights)")


def cmd_demo(args) -> None:
    from msdd.demo import run_demo

    _folder_arg(args.out, "--out")
    run_demo(args.out, minutes=args.minutes, preset=args.preset, overrides=tuple(args.overrides), device=args.device)


def cmd_fidelity(args) -> None:
    from msdd.eval.fidelity import Fidelity

    _folder_arg(args.out, "--out")
    Fidelity(args.out, args.minutes, preset=args.preset, overrides=tuple(args.overrides), seeds=args.seeds,
             total_steps=args.total_steps, quick=args.quick, device=args.device,
             ssdd_overrides=tuple(args.ssdd_overrides), train_steps=args.train_steps,
             distill_steps=args.distill_steps).run()


def cmd_fetch_weights(args) -> None:
    from msdd.weights import fetch_weights

    for name in args.names:
        print(f"{name}: {fetch_weights(name)}")


def cmd_bench(args) -> None:
    from msdd.eval.bench import QUICK, BenchSettings, format_report, parse_list, run_bench

    given = {
        "preset": args.preset, "overrides": tuple(args.overrides), "model": args.model, "student": args.student,
        "dtype": args.dtype, "compile": args.compile, "batch_size": args.batch_size, "resolution": args.resolution,
        "steps": _parse_steps(args.steps), "cfg": args.cfg, "rounds": args.rounds, "warmup": args.warmup,
        "threads": args.threads, "contenders": parse_list(args.contenders, "--contenders"),
        "resolutions": parse_list(args.resolutions, "--resolutions", int), "device": args.device, "quick": args.quick,
        "ssdd_preset": args.ssdd_preset, "ssdd_steps": args.ssdd_steps,
    }
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    settings = BenchSettings(**({**QUICK, **given} if args.quick else given))
    report = run_bench(settings)
    print(format_report(report))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {out}")


def build_parser() -> argparse.ArgumentParser:
    from msdd.weights import PRETRAINED

    parser = argparse.ArgumentParser(prog="msdd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="stage 1: train encoder + multi-scale flow decoder",
                       description="Stage 1. Also runs under torchrun / srun: train.batch_size is the global batch, "
                                   "split over the processes and train.grad_accum micro-batches. SIGTERM / SIGINT "
                                   "write a checkpoint and exit; the same command continues the run.")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: train.max_steps)")
    p.add_argument("--minutes", type=float, default=None, help="also stop after this much wall time")
    p.add_argument("--limit", type=int, default=None, help="use only N training images per epoch (data.limit)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="fine-tune: start from this trained model (directory, bundled name such as tiny-64-teacher, "
                        "or HF repo id) instead of random weights (train.init_from)")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for the LPIPS loss (vgg16-397923af.pth)")
    p.add_argument("--dinov2-weights", default=None,
                   help="DINOv2 ViT-S/14 weights file for the REPA loss of SSDD models (dinov2_vits14_pretrain.pth)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="stage 2: distil a stage-1 model into a one-step-per-stage student",
                       description="Stage 2. Runs under torchrun / srun like `msdd train` (distill.batch_size is "
                                   "global, distill.grad_accum micro-batches). An msdd teacher is distilled into a "
                                   "one-step-per-stage student (discriminator, SPEC 7); an SSDD teacher into a "
                                   "single-step student without GAN (SPEC 10).")
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="stage-1 model directory (e.g. runs/x/model)")
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: distill.max_steps)")
    p.add_argument("--minutes", type=float, default=None, help="also stop after this much wall time")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--dino-weights", default=None, help="DINO ViT-S/16 weights file (dino_deitsmall16_pretrain.pth)")
    p.add_argument("--limit", type=int, default=None, help="use only N training images per epoch (data.limit)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("reconstruct", help="encode + decode images; writes PNGs, a grid and metrics.csv",
                       description="Encode + decode images; writes PNGs, a grid and metrics.csv. Each image's decode "
                                   "noise is seeded from --seed and its output name, so it does not depend on "
                                   "--batch-size or on the other inputs.")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: bundled model)")
    p.add_argument("--out", default="reconstructions", help="output folder (default: reconstructions)")
    p.add_argument("--device", default="cpu")
    _add_decode_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("eval", help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID) with the protocol in the JSON")
    p.add_argument("--model", default=None, help="model directory (default: bundled model)")
    p.add_argument("--compare", nargs="*", default=[], help="more model directories evaluated in the same run")
    p.add_argument("--data", default="embedded", help="'embedded' (held-out photos) or an image folder (e.g. ImageNet val)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--pca-source", default="embedded",
                   help="training data the PCA baseline is fitted on (20,000 crops, cached): 'embedded', a folder, "
                        "or 'none' to skip it (default: embedded)")
    p.add_argument("--sweep-steps", default=None,
                   help="several teacher schedules separated by ';', e.g. '1;2;5;10' or '30,30,30,30;10,10,10,10'")
    p.add_argument("--out", default="eval.json", help="results JSON (default eval.json)")
    p.add_argument("--plot", default=None, help="also save a quality-vs-speed (Pareto) plot PNG here")
    p.add_argument("--inception-weights", default=None, help="Inception file for rFID (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    _add_decode_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="parameter counts, tokens per stage, FLOPs per decode")
    _add_config_args(p)
    p.add_argument("--model", default=None, help="a model directory instead of a preset")
    p.add_argument("--step-time", type=int, default=0, metavar="ROUNDS",
                   help="also measure a training step of the preset in fp32 and bf16, side by side, over ROUNDS "
                        "alternating rounds (runs the model: seconds per round at tiny-64, minutes at paper scale)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("latent-stats", help="compute per-channel latent mean/std and store them in the model",
                       description="Writes the model with the new statistics to --out (default: back into a model "
                                   "directory given as --model), its weights in the type they were stored in.")
    p.add_argument("--model", required=True, help="model directory, bundled name or HF repo id")
    p.add_argument("--out", default=None,
                   help="model directory to write (required for a bundled name or repo id; default: --model itself)")
    p.add_argument("--data", default="embedded", help="'embedded' or a folder of images")
    p.add_argument("--max-images", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_latent_stats)

    p = sub.add_parser("export", help="copy a model directory with its weights stored in fp16 (half the size)")
    p.add_argument("--model", required=True, help="model directory to copy")
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="stored weight type (default fp16)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train the tiny preset on the embedded photos, evaluate, write a report")
    _add_config_args(p)
    p.add_argument("--minutes", type=float, default=None,
                   help="size both stages to this wall-time budget from a measured step time instead of the fixed "
                        "step counts (the model then depends on the machine's speed)")
    p.add_argument("--out", default="msdd-demo", help="output folder (default: msdd-demo)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fidelity", help="the paper's Tables 2-3 / Figure 4 in miniature on the embedded photos")
    _add_config_args(p)
    p.add_argument("--minutes", type=float, default=120.0, help="total training budget (default 120)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (default 2)")
    p.add_argument("--total-steps", type=int, default=40, help="Euler steps every teacher shares (default 40)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="fixed stage-1 steps per job instead of sizing them from --minutes (same models on any machine)")
    p.add_argument("--distill-steps", type=int, default=None, help="fixed distillation steps per student")
    p.add_argument("--ssdd-set", dest="ssdd_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the SSDD preset (repeatable)")
    p.add_argument("--quick", action="store_true", help="a 32 px toy model and 1 seed: about a minute, same table")
    p.add_argument("--out", default="benchmarks/fidelity/latest", help="output folder")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("fetch-weights", help="download pretrained files into the torch hub cache (online)")
    p.add_argument("names", nargs="+", choices=sorted(PRETRAINED))
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("bench", help="decode throughput: student, teacher, single-scale, SD-VAE and SSDD side by side")
    _add_config_args(p)
    p.add_argument("--model", default=None, help="trained model directory (e.g. a teacher) instead of random "
                                                 "weights of --preset (--preset/--set are then ignored)")
    p.add_argument("--student", default=None, help="distilled student model directory (default: the --model or "
                                                   "preset architecture at one step per stage)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="fp32 (default) or bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoders (compile time reported apart)")
    p.add_argument("--batch-size", type=int, default=None, help="images per decode call (default 4)")
    p.add_argument("--resolution", type=int, default=None, help="decode resolution (default: the model's; same stages)")
    p.add_argument("--steps", type=str, default=None,
                   help="teacher Euler steps per stage: one int or a comma list (default: the model's schedule)")
    p.add_argument("--cfg", type=float, default=None, help="teacher guidance scale (default: the model's)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, every contender once per round (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--contenders", type=str, default=None,
                   help="comma list, a subset of student,student-bf16,teacher,teacher-nocfg,single-scale,sd-vae,"
                        "ssdd-student,ssdd-teacher (default: all; student-bf16 is the student under bf16 "
                        "autocast whatever --dtype says, for the bf16/fp32 ratio in one run)")
    p.add_argument("--ssdd-preset", default=None,
                   help="SSDD preset (or YAML) of the ssdd-* rows, random weights at the benchmark resolution "
                        "(default: ssdd-m-256 from 256 px up, else ssdd-tiny-64)")
    p.add_argument("--ssdd-steps", type=int, default=None, help="ssdd-teacher Euler steps (default: the preset's)")
    p.add_argument("--resolutions", type=str, default=None,
                   help="also time student and teacher at these resolutions, one stage more per doubling, "
                        "e.g. 64,128,256")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: batch 2, 1 warm-up, 2 rounds, 2 teacher steps per stage")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
