"""The README's reconstruction grid: real | bicubic | PCA | teacher | student on held-out photos.

    python benchmarks/shipped_grid.py --teacher tiny-64-teacher --student tiny-64-student --out docs/tiny-64-grid.png

Rows: the three whole held-out photos first, then tiles (12 rows); baselines with as many floats as the
latent (PCA fitted on 20,000 embedded training crops); decode seed 0, fp32, each model's default schedule.
"""

import argparse

import torch

from msdd import Tokenizer
from msdd.data.embedded import embedded_eval_set
from msdd.eval.baselines import pca_baseline, pca_for_source
from msdd.eval.grid import save_grid
from msdd.eval.metrics import bicubic_baseline
from msdd.eval.reconstruct import reconstruct_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="tiny-64-teacher")
    p.add_argument("--student", default="tiny-64-student")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--out", default="docs/tiny-64-grid.png")
    args = p.parse_args()
    teacher, student = Tokenizer.from_pretrained(args.teacher), Tokenizer.from_pretrained(args.student)
    images, names = embedded_eval_set(teacher.config.image_size)
    order = sorted(range(len(names)), key=lambda i: ("_" in names[i], i))[: args.rows]  # whole photos first
    x = images[order]
    floats = teacher.config.latent_tokens * teacher.config.latent_dim
    pca = pca_for_source("embedded", teacher.config.image_size, floats)
    columns = [x, bicubic_baseline(x, floats), pca_baseline(pca, x),
               reconstruct_images(teacher, x, seed=0)[0], reconstruct_images(student, x, seed=0)[0]]
    print(f"grid -> {save_grid(columns, args.out)} (real | bicubic | PCA | teacher | student)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
