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


def cmd_train(args) -> None:
    from msdd.config import load_config
    from msdd.train.stage1 import Stage1Trainer

    cfg = load_config(args.preset, args.overrides)
    trainer = Stage1Trainer(cfg, args.run_dir, device=args.device, require_resume=args.resume)
    summary = trainer.fit(max_steps=args.max_steps, minutes=args.minutes)
    print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": summary["last"]}, indent=2))
    print(f"model written to {Path(args.run_dir) / 'model'}")


def cmd_distill(args) -> None:
    from msdd.config import load_config
    from msdd.train.distill import Distiller

    cfg = load_config(args.preset, args.overrides)
    distiller = Distiller(cfg, args.teacher, args.run_dir, device=args.device, vgg_weights=args.vgg_weights,
                          dino_weights=args.dino_weights, require_resume=args.resume)
    summary = distiller.fit(max_steps=args.max_steps, minutes=args.minutes)
    print(json.dumps(summary, indent=2))
    print(f"one-step student written to {Path(args.run_dir) / 'model'}")


def cmd_reconstruct(args) -> None:
    from msdd.eval.reconstruct import collect_inputs, reconstruct_images, write_reconstructions
    from msdd.tokenizer import Tokenizer

    steps = _parse_steps(args.steps)
    tok = Tokenizer.from_pretrained(args.model, device=args.device)
    images, names, skipped = collect_inputs(args.inputs, tok.config.image_size)
    recon, decode_s = reconstruct_images(tok, images, steps, args.cfg, args.seed, args.batch_size, args.bf16)
    summary = write_reconstructions(args.out, names, images, recon)
    print(f"{summary['n']} images reconstructed ({len(skipped)} skipped) -> {args.out}: mean PSNR "
          f"{summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, decode {decode_s:.3f} s/image")


def cmd_info(args) -> None:
    import torch

    from msdd.config import load_config
    from msdd.eval.flops import decode_flops, decoder_pass_flops, encoder_flops
    from msdd.tokenizer import Tokenizer

    if args.model:
        tok = Tokenizer.from_pretrained(args.model)
        cfg = tok.config
    else:
        cfg = load_config(args.preset, args.overrides).model
        with torch.device("meta"):  # shapes only: counting parameters and FLOPs costs no compute
            tok = Tokenizer(cfg)
    n_enc = sum(p.numel() for p in tok.encoder.parameters())
    n_dec = sum(p.numel() for p in tok.decoder.parameters())
    passes = decoder_pass_flops(tok)
    steps = tok.default_steps()
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
    print(json.dumps(info, indent=2))


def cmd_latent_stats(args) -> None:
    from msdd.data import build_train_dataset
    from msdd.train.stage1 import compute_latent_stats
    from msdd.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.model, device=args.device)
    dataset = build_train_dataset(args.data, tok.config.image_size, seed=0)
    mean, std = compute_latent_stats(tok, dataset, max_images=args.max_images)
    tok.latent_mean.copy_(mean)
    tok.latent_std.copy_(std)
    tok.save_pretrained(args.model, **{k: v for k, v in tok.metadata.items() if k not in ("format", "format_version", "model")})
    print(json.dumps({"mean": [round(v, 5) for v in mean.tolist()], "std": [round(v, 5) for v in std.tolist()]}))


def cmd_demo(args) -> None:
    from msdd.demo import run_demo

    run_demo(args.out, minutes=args.minutes, preset=args.preset, overrides=tuple(args.overrides), device=args.device)


def cmd_fetch_weights(args) -> None:
    from msdd.weights import fetch_weights

    for name in args.names:
        print(f"{name}: {fetch_weights(name)}")


def build_parser() -> argparse.ArgumentParser:
    from msdd.weights import PRETRAINED

    parser = argparse.ArgumentParser(prog="msdd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="stage 1: train encoder + multi-scale flow decoder")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: train.max_steps)")
    p.add_argument("--minutes", type=float, default=None, help="also stop after this much wall time")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="stage 2: distil a stage-1 model into a one-step-per-stage student")
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="stage-1 model directory (e.g. runs/x/model)")
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: distill.max_steps)")
    p.add_argument("--minutes", type=float, default=None, help="also stop after this much wall time")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--dino-weights", default=None, help="DINO ViT-S/16 weights file (dino_deitsmall16_pretrain.pth)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("reconstruct", help="encode + decode images; writes PNGs, a grid and metrics.csv")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: bundled model)")
    p.add_argument("--out", default="reconstructions", help="output folder (default: reconstructions)")
    p.add_argument("--device", default="cpu")
    _add_decode_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("info", help="parameter counts, tokens per stage, FLOPs per decode")
    _add_config_args(p)
    p.add_argument("--model", default=None, help="a model directory instead of a preset")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("latent-stats", help="compute per-channel latent mean/std and store them in the model")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="embedded", help="'embedded' or a folder of images")
    p.add_argument("--max-images", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_latent_stats)

    p = sub.add_parser("demo", help="train the tiny preset on the embedded photos, evaluate, write a report")
    _add_config_args(p)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes (default 10)")
    p.add_argument("--out", default="msdd-demo", help="output folder (default: msdd-demo)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fetch-weights", help="download pretrained files into the torch hub cache (online)")
    p.add_argument("names", nargs="+", choices=sorted(PRETRAINED))
    p.set_defaults(func=cmd_fetch_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
