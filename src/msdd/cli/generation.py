"""`msdd gen-train` and `msdd generate`: the latent generator (`msdd.generator`) trained on a tokenizer's
latents, and images sampled from it."""

from __future__ import annotations

import argparse

from msdd.cli.common import (device_arg, finish_training, folder_arg, positive_float, positive_int,
                              removed_if_left_empty, seed_arg)


def cmd_gen_train(args) -> int:
    from msdd.generator.config import load_gen_config
    from msdd.generator.train import GeneratorTrainer

    folder_arg(args.run_dir, "--run-dir")
    with removed_if_left_empty(args.run_dir):
        trainer = GeneratorTrainer(load_gen_config(args.preset, args.overrides), args.tokenizer, args.run_dir,
                                   device=args.device, require_resume=args.resume)
        summary = trainer.fit(max_steps=args.max_steps, minutes=args.minutes)
    return finish_training(trainer, summary, "generator")


def cmd_generate(args) -> int:
    import warnings

    import torch

    from msdd.generator.files import load_generator, write_samples
    from msdd.generator.flow import check_sampling, generate
    from msdd.hub import WEIGHTS_NAME, file_sha256, latent_space_sha256, resolve_model_dir
    from msdd.seeding import image_generators
    from msdd.tokenizer import Tokenizer

    out = folder_arg(args.out, "--out")
    if args.metrics:  # before any sampling
        from msdd.data import check_source

        if args.n < 2:  # a covariance of one sample divides by zero: NaN
            raise ValueError(f"--metrics with --n {args.n}: the latent FD needs at least 2 samples (far more than "
                             "the latent's floats for a figure that compares across runs)")
        check_source(args.data, "--data")
    model, meta = load_generator(args.generator, device=args.device)
    check_sampling(model, args.n, args.steps, args.guidance, args.class_label)
    held = sorted((out / "images").glob("*.png")) if (out / "images").is_dir() else []
    found = ([f"{len(held)} PNGs in images/"] if held else []) + \
        (["metrics.json"] if (out / "metrics.json").exists() else [])
    if found:  # samples of two runs side by side: an FID over the folder would mix them
        raise ValueError(f"--out {out} holds an earlier run's samples ({' and '.join(found)}): pass a new --out, or "
                         "remove them first")
    tok = Tokenizer.from_pretrained(args.tokenizer, device=args.device)
    if "latent_space_sha256" in meta:  # the encoder and latent statistics: the teacher's student shares them
        if latent_space_sha256(tok) != meta["latent_space_sha256"]:
            warnings.warn(f"--tokenizer {args.tokenizer} does not have the latent space this generator was trained "
                          f"on ({meta.get('tokenizer')}): its encoder or latent statistics differ")
    elif meta.get("tokenizer_sha256") not in (None, file_sha256(resolve_model_dir(args.tokenizer) / WEIGHTS_NAME)):
        warnings.warn(f"--tokenizer {args.tokenizer} is not the tokenizer this generator was trained on "
                      f"({meta.get('tokenizer')}): its weights differ, so its latent space may too")
    batches = [range(i, min(i + args.batch_size, args.n)) for i in range(0, args.n, args.batch_size)]
    parts = [generate(model, tok, len(b), args.steps, args.guidance, args.class_label,
                      image_generators(args.seed, b))  # sample i: its own noise
             for b in batches]
    images, latents = torch.cat([p.images for p in parts]), torch.cat([p.latents for p in parts])
    grid = write_samples(images, out)
    print(f"{args.n} samples ({args.steps} steps, cfg {args.guidance:g}, seed {args.seed}) written to "
          f"{out / 'images'}; grid {grid}")
    if args.metrics:
        import json

        from msdd.generator.quality import data_images, sample_metrics

        data = data_images(args.data, 2 * args.n, tok.config.image_size, args.seed + 1)
        if len(data) < 4:  # two halves of at least 2 (the data floor compares them)
            raise ValueError(f"--data {args.data}: --metrics needs at least 4 usable images, found {len(data)}")
        half = len(data) // 2
        metrics = sample_metrics(images, latents, tok, data[:half], data[half:2 * half],
                                 torch.Generator().manual_seed(args.seed), args.inception_weights)
        metrics = {"generator": str(args.generator), "tokenizer": str(args.tokenizer), "steps": args.steps,
                   "cfg": args.guidance, "seed": args.seed, "data": args.data, **metrics}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if metrics["samples"] <= metrics["latent_dims"]:
            warnings.warn(f"latent FD from {metrics['samples']} samples of {metrics['latent_dims']}-dim latents: the "
                          "covariances are rank-deficient, so it means something only beside the two baselines printed "
                          f"with it; use --n above {metrics['latent_dims']} for a figure that compares across runs")
        fid = f"FID {metrics['fid']:.2f}" if "fid" in metrics else f"FID skipped ({metrics['fid_skipped']})"
        print(f"latent FD {metrics['latent_fd']:.2f} (N(0, I) latents: {metrics['latent_fd_gaussian_baseline']:.2f}, "
              f"other data images: {metrics['latent_fd_data_floor']:.2f}) over {metrics['latent_dims']} dims; "
              f"{fid}; {metrics['samples']} samples against {metrics['data_images']} images of {args.data}; "
              f"{out / 'metrics.json'}")
    return 0


def add_gen_train(sub) -> None:
    from msdd.generator.config import PRESETS

    p = sub.add_parser("gen-train", help="train a latent generator (DiT/SiT flow matching) on a tokenizer's latents",
                       description="Encodes the training images once with the tokenizer, then trains the generator on "
                                   "their normalised latents with the shared loop (checkpoints, resume, TensorBoard). "
                                   "The final EMA generator is written to <run-dir>/model.")
    p.add_argument("--tokenizer", required=True, metavar="MODEL",
                   help="the tokenizer whose latents to learn (directory, bundled name such as tiny-64, or HF repo id)")
    p.add_argument("--run-dir", required=True, help="run directory (continues automatically if it has checkpoints)")
    p.add_argument("--preset", default="gen-tiny", choices=list(PRESETS), help="generator preset (default: gen-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set generator.depth=6 --set train.lr=1e-4 --set data.source=DIR "
                        "(a key without a section is a generator field; repeatable)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (error if none)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop at this step (default: train.max_steps)")
    p.add_argument("--minutes", type=positive_float, default=None, help="also stop after this much wall time")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    p.set_defaults(func=cmd_gen_train)


def _class_label(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a class index (an int)") from None


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample images: a trained generator's latents, decoded by its tokenizer",
                       description="Samples latents with Euler steps (classifier-free guidance for a class-conditional "
                                   "generator), decodes them with the tokenizer and writes OUT/images/NNNNN.png and "
                                   "OUT/grid.png. The same seed gives the same images.")
    p.add_argument("--generator", required=True, metavar="DIR", help="a generator directory (<run>/model of gen-train)")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="the tokenizer the generator was trained on")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps of the generator (default 50)")
    p.add_argument("--cfg", dest="guidance", metavar="CFG", type=float, default=1.0,
                   help="classifier-free guidance scale (default 1: none; needs a class-conditional generator)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of all sampling and decoding noise (default 0); sample i depends on the seed and i only")
    p.add_argument("--class-label", type=_class_label, default=None, metavar="K",
                   help="class of every sample (a class-conditional generator; default: a random class each)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch (default 64)")
    p.add_argument("--metrics", action="store_true",
                   help="also compare the samples with --n data images: latent FD (the Frechet distance of normalised "
                        "latents, beside N(0, I) latents and --n other data images) and FID when the Inception file "
                        "is found; OUT/metrics.json")
    p.add_argument("--data", default="embedded",
                   help="data images of --metrics (default: crops of the embedded photos)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception file for FID (weights-inception-2015-12-05-6726825d.pth; default: the torch cache)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.set_defaults(func=cmd_generate)
