"""Where a stage-2 (distillation) step's time goes, and what torch.compile of the student's blocks does to it: the
trainer's own step (`Distiller.train_step`: the preset's autocast, discriminator and losses) on random images, for
six variants alternated step by step in one process: the student's blocks eager or compiled (`distill.compile`) x the
adversarial weight: adaptive (`distill.adaptive_of=total`, the default: `adaptive_loss`, the gradients of both loss
terms in two full backward passes), adaptive against the reference term (`adaptive_of=reference`: `adaptive_weight`,
two backward passes to the decoder's last layer, then the step's backward pass through the sum; the way every
adaptive weight was computed before `adaptive_loss`), or fixed (`adaptive_adv=false`). The step's parts are timed by
wrapping the distiller's own functions: `student_pass` (the student's one-step-per-stage forward), `teacher_targets`
(the frozen teacher's passes, no gradients), "adaptive" (`adaptive_loss` or `adaptive_weight`); "rest" is the step
less those (the discriminator, the losses, the backward pass of the step, the optimiser and EMA steps).

    python benchmarks/distill_step.py --preset tiny-64 --teacher tiny-64-teacher --steps 12 --out distill-step.json

At the paper's scale (paper-256: a 415M-parameter teacher, the DINO discriminator and LPIPS) the networks' weights
are random (`--teacher random`, `--random-loss-networks`: a random VGG16 and DINO ViT-S/16 written to a temporary
folder; their times are those of the pretrained files), one variant per process (`--variants`: one distiller of
that size holds 10.6-11.6 GB), and the forward passes of LPIPS and of the discriminator are timed too (their backward
passes are in "adaptive" and "rest"):

    python benchmarks/distill_step.py --preset paper-256 --teacher random --random-loss-networks \
        --set distill.batch_size=1 data.source=embedded data.eval_source=embedded \
        --variants "eager, reference term" --steps 3 --out distill-step-paper.json

(the data settings only because the distiller reads its preview images from `data.eval_source` when it starts).

Medians in ms.
"""

import argparse
import tempfile
import time

import torch

import msdd.malloc
import msdd.train.distill as distill
from msdd.config import load_config
from msdd.models.discriminator import DinoDiscriminator, PatchDiscriminator
from msdd.models.perceptual import LPIPS
from msdd.tokenizer import Tokenizer
from train_step import report  # benchmarks/, this script's folder

PARTS = {"student_pass": "student_pass", "teacher_targets": "teacher_targets", "adaptive_loss": "adaptive",
         "adaptive_weight": "adaptive"}  # function: part
FORWARDS = {LPIPS: "lpips forward", DinoDiscriminator: "discriminator forward",
            PatchDiscriminator: "discriminator forward"}  # class: part (their forward passes, wherever called)
WEIGHTS = {"adaptive weight": ("adaptive_of=total", "adaptive_adv=true"),
           "reference term": ("adaptive_of=reference", "adaptive_adv=true"), "fixed weight": ("adaptive_adv=false",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-64")
    ap.add_argument("--teacher", default="tiny-64-teacher",
                    help="a stage-1 model: a directory or a bundled name; `random`: the preset's networks, random")
    ap.add_argument("--random-loss-networks", action="store_true",
                    help="LPIPS's VGG16 and the DINO discriminator with random weights (no pretrained file needed)")
    ap.add_argument("--variants", nargs="+", help="variant names, each quoted (default: all six)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. "
                    "distill.batch_size=1")
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each variant (after 2 warm-up steps)")
    ap.add_argument("--out", help="write the medians as JSON here")
    args = ap.parse_args()
    msdd.malloc.tune()
    cfg = load_config(args.preset, args.set)
    variants = {("compiled, " if compiled else "eager, ") + weight: (*settings, f"compile={str(compiled).lower()}")
                for compiled in (False, True) for weight, settings in WEIGHTS.items()}
    chosen = args.variants or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {list(variants)}")
    parts = sorted({*PARTS.values(), *FORWARDS.values()})
    clock = dict.fromkeys(parts, 0.0)
    for fn, part in PARTS.items():  # the distiller calls these by their module names: each call adds its time
        setattr(distill, fn, _timed(getattr(distill, fn), part, clock))
    for cls, part in FORWARDS.items():
        cls.forward = _timed(cls.forward, part, clock)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if teacher == "random":
            teacher = f"{tmp}/teacher"
            Tokenizer(cfg.model).save_pretrained(teacher)
        files = _random_loss_networks(tmp) if args.random_loss_networks else {}
        for name in chosen:
            over = [*args.set, *(f"distill.{s}" for s in variants[name])]
            runs[name] = distill.Distiller(load_config(args.preset, over), teacher, f"{tmp}/{len(runs)}", **files)
        r = cfg.model.image_size
        images = torch.rand(cfg.distill.batch_size, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1
        times = {name: {part: [] for part in (*parts, "rest", "step")} for name in runs}
        first_step = {}
        for i in range(2 + args.steps):
            for name, d in runs.items():
                clock.update(dict.fromkeys(parts, 0.0))
                start = time.perf_counter()
                d.train_step(images)
                step = time.perf_counter() - start
                if i == 0:
                    first_step[name] = round(step, 2)  # compiles the compiled variants' graphs
                if i >= 2:
                    for part in parts:
                        times[name][part].append(clock[part] * 1e3)
                    times[name]["rest"].append((step - sum(clock.values())) * 1e3)
                    times[name]["step"].append(step * 1e3)
    report({"preset": args.preset, "teacher": args.teacher, "overrides": args.set,
            "random_loss_networks": args.random_loss_networks, "batch_size": cfg.distill.batch_size,
            "bf16_autocast": cfg.train.bf16, "teacher_steps": cfg.distill.teacher_steps,
            "discriminator": cfg.distill.discriminator, "steps": args.steps}, times, first_step,
           f"{args.preset} from {args.teacher}, batch {cfg.distill.batch_size}, bf16 autocast {cfg.train.bf16}, "
           f"{args.steps} steps of each", args.out)


def _random_loss_networks(folder: str) -> dict:
    """Files of a random VGG16 and DINO ViT-S/16 in `folder`: the Distiller's vgg_weights and dino_weights."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    vgg, dino = f"{folder}/vgg16.safetensors", f"{folder}/dino_vits16.safetensors"
    save_file(torchvision.models.vgg16(weights=None).state_dict(), vgg)
    save_file(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict(), dino)
    return {"vgg_weights": vgg, "dino_weights": dino}


def _timed(fn, part: str, clock: dict):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[part] += time.perf_counter() - start
    return timed


if __name__ == "__main__":
    main()
