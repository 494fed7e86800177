"""`msdd reconstruct`, `eval` and `bench`: the commands that decode with a model and measure it."""

from __future__ import annotations

import json
from pathlib import Path

from msdd.cli.common import (
    add_config_args, add_decode_args, device_arg, file_arg, folder_arg, positive_int, steps_arg,
)  # fmt: skip


def cmd_reconstruct(args) -> None:
    from msdd.eval.reconstruct_files import list_inputs, reconstruct_files
    from msdd.tiles import check_overlap
    from msdd.tokenizer import Tokenizer

    steps = steps_arg(args.steps)
    folder_arg(args.out, "--out")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.tile_overlap is not None and args.size == "crop":
        raise ValueError("--tile-overlap sets the overlap of tiles, and --crop reconstructs one centre crop per file "
                         "without tiles: drop one of them")
    tok = Tokenizer.from_pretrained(args.model, device=args.device)
    r = tok.config.image_size
    if args.tile_overlap is not None:
        check_overlap(args.tile_overlap, r, "--tile-overlap")
    files, names, explicit, keys = list_inputs(args.inputs, exclude=[args.out])
    # each image's noise is seeded from --seed and its own name: independent of --batch-size and the other inputs
    s = reconstruct_files(tok, files, names, explicit, args.out, keys=keys, size=args.size,
                          tile_overlap=args.tile_overlap, steps=steps, guidance=args.guidance, seed=args.seed,
                          batch_size=args.batch_size, bf16=args.bf16, skip_existing=args.skip_existing,
                          workers=args.workers, int8=args.int8)
    reused = f", {s['reused']} kept from an earlier run" if s["reused"] else ""
    decoded = f"decode {s['decode_s']:.3f} s/image" if s["n"] > s["reused"] else "none decoded again"
    print(f"{s['n']} images reconstructed ({len(s['skipped'])} skipped{reused}) -> {args.out}: mean PSNR "
          f"{s['psnr']:.2f} dB, SSIM {s['ssim']:.4f}, {decoded}")


def _print_eval(r: dict) -> None:
    m, p = r["metrics"], r["protocol"]
    extra = "".join(f", {k} {m[k]:.4f}" for k in ("lpips", "rfid") if k in m)
    print(f"{r['label']}: {p['images']} images, PSNR {m['psnr']:.3f} dB, SSIM {m['ssim']:.4f}{extra}, "
          f"decode {r['img_per_s']:.2f} img/s")
    for b in r["baselines"].values():
        print(f"  baseline {b['method']} ({b['floats']} floats): PSNR {b['psnr']:.3f} dB, SSIM {b['ssim']:.4f}")
    for k, why in r["skipped_metrics"].items():
        print(f"  skipped {k}: {why}")
    for w in r["warnings"]:
        print(f"  WARNING: {w}")


def cmd_eval(args) -> None:
    import warnings

    from msdd.data import check_source
    from msdd.dist import cleanup, setup
    from msdd.eval.evaluate import evaluate, finite_or_null
    from msdd.eval.plots import plot_pareto
    from msdd.hub import resolve_model_dir
    from msdd.tokenizer import Tokenizer

    file_arg(args.out, "--out")  # before the decodes
    if args.pca_source != "none":
        check_source(args.pca_source, "--pca-source")
        if args.pca_source != "embedded" and Path(args.pca_source).resolve() == Path(args.data).resolve():
            warnings.warn(f"--pca-source {args.pca_source} is the --data folder: the PCA baseline is fitted on the "
                          "images it is scored on, which flatters it; pass a folder of training images")
    if args.plot:
        file_arg(args.plot, "--plot")
    info, device = setup(args.device)
    runs = []  # (model dir, tokenizer, steps)
    for path in [args.model, *args.compare]:
        path = resolve_model_dir(path)  # a folder, a bundled name (default: the bundled student) or a Hub id
        tok = Tokenizer.from_pretrained(path, device=device)
        sweep = [steps_arg(text) for text in args.sweep_steps.split(";")] \
            if args.sweep_steps and not tok.config.one_step else [steps_arg(args.steps)]
        if args.sweep_steps and tok.config.one_step:
            warnings.warn(f"--sweep-steps: {path} is a one-step student, evaluated once at its own schedule")
        for steps in sweep:
            runs.append((path, tok, steps))
    results = []
    for path, tok, steps in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if not info.is_main else "default")
            r = evaluate(tok, args.data, steps=steps, guidance=args.guidance, seed=args.seed, bf16=args.bf16,
                         int8=args.int8, batch_size=args.batch_size, limit=args.limit,
                         inception_weights=args.inception_weights,
                         vgg_weights=args.vgg_weights, dist_info=info, model_path=path,
                         pca_source=None if args.pca_source == "none" else args.pca_source)
        p = r["protocol"]
        r["label"] = f"{'student' if tok.config.one_step else 'teacher'} {p['steps_per_stage']} cfg {p['cfg']:g}"
        r["model"] = str(path)
        results.append(r)
        if info.is_main:
            _print_eval(r)
    if info.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(finite_or_null(results if len(results) > 1 else results[0]), indent=2,
                                             allow_nan=False) + "\n")
        print(f"results -> {args.out}")
        if args.plot:
            points = [{"label": r["label"], "img_per_s": r["img_per_s"], "psnr": r["metrics"]["psnr"],
                       "rfid": r["metrics"].get("rfid")} for r in results]
            title = f"{args.data}, {results[0]['protocol']['device']}, {results[0]['protocol']['dtype']}"
            baselines = {f"{name} ({b['floats']} floats)": b["psnr"] for name, b in results[0]["baselines"].items()}
            print(f"plot -> {plot_pareto(points, args.plot, title=title, baselines=baselines)}")
    cleanup()


def cmd_bench(args) -> None:
    from msdd.eval.bench import QUICK, BenchSettings, format_report, parse_list, run_bench

    out = file_arg(args.json, "--json")  # before minutes of timing
    given = {
        "preset": args.preset, "overrides": tuple(args.overrides), "model": args.model, "student": args.student,
        "dtype": args.dtype, "compile": args.compile, "batch_size": args.batch_size, "resolution": args.resolution,
        "steps": steps_arg(args.steps), "guidance": args.guidance, "rounds": args.rounds, "warmup": args.warmup,
        "min_time": args.min_time,
        "threads": args.threads, "contenders": parse_list(args.contenders, "--contenders"),
        "resolutions": parse_list(args.resolutions, "--resolutions", int), "device": args.device, "quick": args.quick,
        "ssdd_preset": args.ssdd_preset, "ssdd_steps": args.ssdd_steps, "pipeline": args.pipeline or None,
        "gen_preset": args.gen_preset, "gen_steps": args.gen_steps, "gen_cfg": args.gen_cfg,
    }
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    settings = BenchSettings(**({**QUICK, **given} if args.quick else given))
    report = run_bench(settings)
    print(format_report(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {out}")


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="encode + decode images; writes PNGs, a grid and metrics.csv",
                       description="Encode + decode images; writes PNGs, a grid and metrics.csv. Each image's decode "
                                   "noise is seeded from --seed and its own file name (its path within a folder "
                                   "input; not the output name a name collision gives it), so it does not depend on "
                                   "--batch-size or on the other inputs.")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: bundled model)")
    p.add_argument("--out", default="reconstructions", help="output folder (default: reconstructions)")
    p.add_argument("--device", default="cpu", type=device_arg)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--keep-size", dest="size", action="store_const", const="keep",
                      help="every output has its input's size: overlapping tiles at the model's resolution, "
                           "blended (sides shorter than the model padded by reflection). Default for files "
                           "larger than the model")
    size.add_argument("--crop", dest="size", action="store_const", const="crop",
                      help="centre-crop every file to the model's resolution (shorter side resized to it)")
    p.set_defaults(size="auto")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="pixels neighbouring tiles share, at most half the model's resolution (default: a "
                        "quarter of it)")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep reconstructions an earlier run wrote to --out (scored again, not decoded): "
                        "a stopped run continues where it stopped (refused if its reconstruct.json shows other "
                        "weights or settings)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes reading the files (default 0)")
    p.add_argument("--int8", action="store_true",
                   help="encode and decode with int8 matmuls in the transformer streams (CPU; with --bf16 "
                        "where msdd's CPU kernels run)")
    add_decode_args(p)
    p.set_defaults(func=cmd_reconstruct)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID) with the protocol in the JSON")
    p.add_argument("--model", default=None, help="model directory (default: bundled model)")
    p.add_argument("--compare", nargs="*", default=[], help="more model directories evaluated in the same run")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (held-out photos) or an image folder (e.g. ImageNet val)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate only the first N files of --data (unusable ones are skipped and counted, not "
                        "replaced)")
    p.add_argument("--pca-source", default="embedded",
                   help="training data the PCA baseline is fitted on (20,000 crops, cached): 'embedded', a folder, "
                        "or 'none' to skip it (default: embedded)")
    p.add_argument("--sweep-steps", default=None,
                   help="several teacher schedules separated by ';', e.g. '1;2;5;10' or '30,30,30,30;10,10,10,10'")
    p.add_argument("--out", default="eval.json", help="results JSON (default eval.json)")
    p.add_argument("--plot", default=None, help="also save a quality-vs-speed (Pareto) plot PNG here")
    p.add_argument("--inception-weights", default=None,
                   help="Inception file for rFID (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights file for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--int8", action="store_true",
                   help="decode with int8 matmuls in the decoder's transformer streams (CPU; with --bf16 "
                        "where msdd's CPU kernels run)")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="cpu or cuda (under torchrun each process takes its LOCAL_RANK GPU)")
    add_decode_args(p)
    p.set_defaults(func=cmd_eval)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="decode throughput: student, teacher, single-scale, SD-VAE and SSDD side by side")
    add_config_args(p)
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
    p.add_argument("--cfg", dest="guidance", metavar="CFG", type=float, default=None,
                   help="teacher guidance scale (default: the model's)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, every contender once per round (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of a contender's timed sample: a shorter call is repeated back to back and its time "
                        "is their mean (default 1; 0: one call; --quick: 0; not with --pipeline)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--contenders", type=str, default=None,
                   help="comma list, a subset of student,student-eager,student-bf16,teacher,teacher-nocfg,"
                        "single-scale,sd-vae,ssdd-student,ssdd-teacher,encoder,student+encoder, onnx-student and "
                        "student-int8 (default: all but onnx-student and student-int8, the student with its "
                        "matmuls in int8, CPU only; student-eager is the student on the reference path, "
                        "student-bf16 the student under bf16 autocast whatever --dtype says, for the speed-up and "
                        "the bf16/fp32 ratio in one run)")
    p.add_argument("--ssdd-preset", default=None,
                   help="SSDD preset (or YAML) of the ssdd-* rows, random weights at the benchmark resolution "
                        "(default: ssdd-m-256 from 256 px up, else ssdd-tiny-64)")
    p.add_argument("--ssdd-steps", type=int, default=None, help="ssdd-teacher Euler steps (default: the preset's)")
    p.add_argument("--resolutions", type=str, default=None,
                   help="also time student and teacher at these resolutions, one stage more per doubling, "
                        "e.g. 64,128,256")
    p.add_argument("--pipeline", action="store_true",
                   help="end-to-end generation: each row samples latents with its own latent generator (random "
                        "weights of --gen-preset over its latent shape), then decodes them; reports the decoder's "
                        "share of the time (default rows: student,teacher,ssdd-student,sd-vae)")
    p.add_argument("--gen-preset", default=None, help="generator preset of --pipeline (default: gen-xl from 256 px, "
                                                      "else gen-tiny)")
    p.add_argument("--gen-steps", type=int, default=None, help="generator Euler steps of --pipeline (default 50)")
    p.add_argument("--gen-cfg", type=float, default=None,
                   help="generator guidance of --pipeline, one doubled batch (default 1.5; 1 for an unconditional "
                        "preset)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: batch 2, 1 warm-up, 2 rounds, 2 teacher steps per stage, the "
                        "matmul peak probed at the smaller size only")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.set_defaults(func=cmd_bench)
