"""`msdd info`, `latent-stats`, `export`, `push` and `fetch-weights`: the commands that inspect, rewrite,
upload or fetch model files."""

from __future__ import annotations

import json
from pathlib import Path

from msdd.cli.common import add_config_args, device_arg, folder_arg, new_folder_arg, positive_int


def cmd_info(args) -> None:
    import torch

    from msdd.config import load_config
    from msdd.eval.flops import decoder_pass_flops, encoder_flops
    from msdd.tokenizer import Tokenizer

    if args.step_time < 0:
        raise ValueError(f"msdd info: --step-time takes a number of rounds >= 1, got {args.step_time}")
    if args.model and args.step_time:
        raise ValueError("msdd info: --step-time measures a preset's training step; pass --preset/--set, not --model")
    if args.model and args.overrides:
        raise ValueError("msdd info: --set changes a preset; a --model is described as it was trained (drop --set)")
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
    head = {
        "image_size": cfg.image_size, "latent": list(cfg.latent_shape),
        "compression": cfg.compression, "one_step": cfg.one_step,
        "params_encoder_M": round(n_enc / 1e6, 3), "params_decoder_M": round(n_dec / 1e6, 3),
        "encoder_gflop_per_image": round(encoder_flops(tok) / 1e9, 3),
    }
    info = tok.family.info(head, decoder_pass_flops(tok))
    if not args.model:
        info["recipe"] = _recipe(full)
    if args.step_time:
        info["train_step"] = _step_times(full, args.step_time)
    print(json.dumps(info, indent=2))


def _recipe(cfg) -> dict:
    """The training recipe a preset runs, in the terms the paper and its reference code use (issue 15), to
    check before paying for GPUs."""
    f, t, d = cfg.model.flow, cfg.train, cfg.distill
    return {
        "networks": {"init": [cfg.model.encoder.init, cfg.model.decoder.init],
                     "context_pos": [cfg.model.encoder.context_pos, cfg.model.decoder.context_pos],
                     "time_scale": cfg.model.decoder.time_scale},
        "stage1": {"loss_weighting": f.loss_weighting, "sigmoid_bias": f.sigmoid_bias,
                   "loss_reduction": f.loss_reduction,
                   "t_sampling": f.t_sampling, "prediction": f.prediction, "lpips_weight": f.lpips_weight,
                   "cfg_drop": f.cfg_drop, "batch_size": t.batch_size, "lr": t.lr, "warmup_steps": t.warmup_steps,
                   "max_steps": t.max_steps, "min_lr_ratio": t.min_lr_ratio, "ema_decay": t.ema_decay,
                   "ema_warmup": t.ema_warmup, "grad_clip": t.grad_clip, "bf16": t.bf16},
        "stage2": {"batch_size": d.batch_size, "lr": d.lr * d.lr_batch_factor, "disc_lr": d.disc_lr * d.lr_batch_factor,
                   "lr_reference_batch": d.lr_reference_batch, "disc_grad_clip": d.disc_grad_clip,
                   "max_steps": d.max_steps, "ema_decay": d.ema_decay, "ema_warmup": d.ema_warmup,
                   "discriminator": d.discriminator, "disc_heads": d.disc_heads,
                   "student_cfg_drop": d.student_cfg_drop, "perceptual": d.perceptual,
                   "lambda_rec": d.lambda_rec, "lambda_perc": d.lambda_perc, "lambda_adv": d.lambda_adv,
                   "lambda_pix": d.lambda_pix, "adaptive_adv": d.adaptive_adv, "adaptive_of": d.adaptive_of,
                   "teacher_cfg": d.cfg},
    }


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


def cmd_latent_stats(args) -> None:
    import torch

    from msdd.data import build_train_dataset
    from msdd.hub import BUNDLED, resolve_model_dir, save_tokenizer, stored_dtype
    from msdd.train.stage1 import compute_latent_stats
    from msdd.tokenizer import Tokenizer

    local = args.model not in BUNDLED and Path(args.model).expanduser().is_dir()
    if args.model not in BUNDLED and not local and (Path(args.model).expanduser().exists()
                                                     or args.model.startswith(("/", ".", "~"))):
        raise ValueError(f"--model {args.model} is not a model folder; pass a folder with config.json and "
                         "model.safetensors, or a bundled name")
    if args.out is None and not local:
        what = "a bundled model (part of the installed package)" if args.model in BUNDLED else "not a local directory"
        raise ValueError(f"--model {args.model} is {what}, so it is not rewritten: pass --out DIR, the model "
                         "directory to write with the new statistics")
    out = folder_arg(args.out if args.out is not None else args.model, "--out")
    source = resolve_model_dir(args.model)
    tok = Tokenizer.from_pretrained(source, device=args.device)  # first: it names a damaged weights file
    dtype = stored_dtype(source)  # kept: an fp16 model stays fp16, wherever it is written
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
    from msdd.io import atomic_folder
    from msdd.tokenizer import export_tokenizer

    out = new_folder_arg(args.out, "--out")
    if args.dtype is not None and args.format != "msdd":
        raise ValueError(f"--dtype applies to --format msdd only: the {args.format} export writes float32 weights "
                         "(drop --dtype)")
    try:
        if args.format == "onnx":
            from msdd.integrations.onnx import export_onnx

            with atomic_folder(out) as tmp:  # export_onnx checks the onnx extra before any work
                export_onnx(args.model, tmp)
            print(f"wrote {out}: encoder.onnx, decoder.onnx (the whole decode at the model's default schedule, its "
                  "noise as inputs; msdd.integrations.onnx.OnnxTokenizer runs them), onnx.json")
        elif args.format == "diffusers":
            from msdd.integrations.diffusers import export_diffusers

            with atomic_folder(out) as tmp:
                export_diffusers(args.model, tmp)
            print(f"wrote {out} (diffusers layout, AutoencoderMSDD, fp32 weights)")
        else:
            dtype = args.dtype or "fp16"
            with atomic_folder(out) as tmp:
                export_tokenizer(args.model, tmp, dtype)
            print(f"wrote {out} ({dtype} weights)")
    except ImportError as e:  # an optional extra that is not installed: its message names the pip command
        raise ValueError(str(e)) from None


def cmd_push(args) -> None:
    from huggingface_hub.utils import validate_repo_id

    from msdd.hub import push_model, resolve_model_dir, stage_for_hub

    try:
        validate_repo_id(args.repo)
    except ValueError as e:  # huggingface_hub's HFValidationError
        raise ValueError(f"repo {args.repo!r} is not a Hub repo id ({e}); pass owner/name") from None
    directory = resolve_model_dir(args.model)
    if args.eval_json:
        evaluation = _evaluation(Path(args.eval_json), f"--eval-json {args.eval_json}")
    elif (directory / "eval.json").is_file():
        evaluation = _evaluation(directory / "eval.json", str(directory / "eval.json"))
    else:
        evaluation = None
    if args.stage_only:
        from msdd.io import atomic_folder

        out = new_folder_arg(args.stage_only, "--stage-only")
        with atomic_folder(out) as tmp:
            stage_for_hub(directory, tmp, args.repo, evaluation)
        print(f"wrote {out} (nothing uploaded)")
        return
    url = push_model(directory, args.repo, args.private, args.token, evaluation)
    print(f"pushed {directory} to {args.repo}: {url}")


def _evaluation(path: Path, what: str) -> dict:
    """The evaluation a model card shows: the JSON `msdd eval --out` writes for one model (an object with a
    "metrics" object of numbers, and "protocol" and "baselines" objects where present)."""
    try:
        evaluation = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: not a readable JSON file ({e}); pass the file `msdd eval --out` wrote") from None
    metrics = evaluation.get("metrics") if isinstance(evaluation, dict) else None
    baselines = evaluation.get("baselines", {}) if isinstance(evaluation, dict) else None
    if (not isinstance(metrics, dict) or not isinstance(evaluation.get("protocol", {}), dict)
            or not isinstance(baselines, dict) or not all(isinstance(b, dict) for b in baselines.values())
            or not all(isinstance(v, (int, float)) or v is None for v in metrics.values())):
        raise ValueError(f"{what}: not the results of one model as `msdd eval --out` writes them (an object with "
                         '"metrics": {"psnr": ..., ...}); for a run with --compare, keep the one entry of this model')
    return evaluation


def cmd_fetch_weights(args) -> None:
    from msdd.weights import fetch_weights

    for name in args.names:
        print(f"{name}: {fetch_weights(name)}")


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, tokens per stage, FLOPs per decode")
    add_config_args(p)
    p.add_argument("--model", default=None, help="a model directory instead of a preset")
    p.add_argument("--step-time", type=int, default=0, metavar="ROUNDS",
                   help="also measure a training step of the preset in fp32 and bf16, side by side, over ROUNDS "
                        "alternating rounds (runs the model: seconds per round at tiny-64, minutes at paper scale)")
    p.set_defaults(func=cmd_info)


def add_latent_stats(sub) -> None:
    p = sub.add_parser("latent-stats", help="compute per-channel latent mean/std and store them in the model",
                       description="Writes the model with the new statistics to --out (default: back into a model "
                                   "directory given as --model), its weights in the type they were stored in.")
    p.add_argument("--model", required=True, help="model directory, bundled name or HF repo id")
    p.add_argument("--out", default=None,
                   help="model directory to write (required for a bundled name or repo id; default: --model itself)")
    p.add_argument("--data", default="embedded", help="'embedded' or a folder of images")
    p.add_argument("--max-images", type=positive_int, default=2048, help="images to encode (default 2048)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.set_defaults(func=cmd_latent_stats)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="copy a model with its weights stored in fp16 (half the size), or write it in "
                                      "diffusers' layout or as ONNX graphs")
    p.add_argument("--model", required=True, help="model directory or bundled name to copy")
    p.add_argument("--out", required=True, help="a new or empty folder, written whole (an interrupted export leaves "
                                                 "none)")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="stored weight type of --format msdd (default fp16)")
    p.add_argument("--format", default="msdd", choices=["msdd", "diffusers", "onnx"],
                   help="msdd: config.json + model.safetensors (default); diffusers: a folder for "
                        "msdd.integrations.diffusers.AutoencoderMSDD.from_pretrained (needs msdd[diffusers]); onnx: "
                        "encoder.onnx + decoder.onnx for onnxruntime (needs msdd[onnx])")
    p.set_defaults(func=cmd_export)


def add_push(sub) -> None:
    p = sub.add_parser("push", help="upload a model to the Hugging Face Hub with a generated model card (online)",
                       description="Uploads config.json, model.safetensors and a README.md model card made from the "
                                   "model's metadata and its evaluation (--eval-json, or eval.json in the model "
                                   "directory). The repo is created if absent.")
    p.add_argument("model", help="model directory or bundled name")
    p.add_argument("repo", help="Hub repo id, owner/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` stored; "
                                                 "`huggingface-cli login` before huggingface_hub 0.34)")
    p.add_argument("--eval-json", default=None, help="the JSON `msdd eval --out` wrote for this model")
    p.add_argument("--stage-only", default=None, metavar="DIR",
                   help="write the folder that would be uploaded to DIR (new or empty) and upload nothing (to review "
                        "the card)")
    p.set_defaults(func=cmd_push)


def add_fetch_weights(sub) -> None:
    from msdd.weights import PRETRAINED

    p = sub.add_parser("fetch-weights", help="download pretrained files into the torch hub cache (online)")
    p.add_argument("names", nargs="+", choices=sorted(PRETRAINED))
    p.set_defaults(func=cmd_fetch_weights)
