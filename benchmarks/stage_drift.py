"""Per-stage fidelity of a multi-scale decode on the embedded held-out photos (msdd.eval.stages).

    python benchmarks/stage_drift.py --model tiny-64-teacher --steps 10 --out drift.json

Prints one row per stage (PSNR of the stage's signal part at its resolution, and of its coarse content
at the first stage's resolution) and writes them with the command and settings as JSON.
"""

import argparse
import json
import sys

from msdd import Tokenizer
from msdd.data.embedded import embedded_eval_set
from msdd.eval.stages import stage_fidelity
from msdd.families import parse_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-64-teacher", help="bundled name or model directory (msdd family)")
    p.add_argument("--steps", default=None, help="steps per stage: an int or a comma list (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    try:
        steps = parse_steps(args.steps)
    except ValueError as e:
        p.error(str(e))
    tok = Tokenizer.from_pretrained(args.model)
    images, _ = embedded_eval_set(tok.config.image_size)
    rows = stage_fidelity(tok, images, steps=steps, guidance=args.cfg, seed=args.seed)
    first = rows[0]["resolution"]
    print(f"{args.model}: steps {list(tok.resolve_steps(steps))}, cfg {tok.resolve_guidance(args.cfg)}, "
          f"{len(images)} held-out images")
    print(f"| stage | resolution | noise left | PSNR (dB) | PSNR at {first} px |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['resolution']} | {r['noise_level']} | {r['psnr']:.2f} | {r['coarse_psnr']:.2f} |")
    if args.out:
        record = {"command": " ".join(["python"] + sys.argv), "model": args.model, "images": len(images),
                  "steps": list(tok.resolve_steps(steps)), "cfg": tok.resolve_guidance(args.cfg), "seed": args.seed,
                  "stages": rows}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
