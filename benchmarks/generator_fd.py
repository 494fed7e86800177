"""Latent FD of trained generators at a larger sample count than `msdd generate --metrics` (latents only,
no decoding): N data crops against N other crops (the floor), N(0, I) latents, and N samples (50 Euler steps)
of each generator, in the shipped tiny-64 tokenizer's normalised latent space.

    python benchmarks/generator_fd.py 2048 runs/gen/model [more generator dirs]
"""

import argparse

import torch

from msdd.generator import load_generator, sample_latents
from msdd.generator.quality import data_images, frechet_distance, normalised_latents
from msdd.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("n", type=int, help="samples per side (at least 2; chunks of 512, each seeded by its index)")
parser.add_argument("generators", nargs="*", help="generator directories (gen-train's <run>/model)")
args = parser.parse_args()
if args.n < 2:
    parser.error(f"n {args.n}: a Frechet distance needs at least 2 samples")
n = args.n
tok = Tokenizer.from_pretrained("tiny-64")
x = data_images("embedded", 2 * n, 64, 1)
with torch.no_grad():
    a, b = normalised_latents(tok, x[:n]), normalised_latents(tok, x[n:])
noise = torch.randn(n, 32, 8)
print("n", n, "data floor", round(frechet_distance(a, b), 2), "noise", round(frechet_distance(noise, a), 2))
for d in args.generators:
    g, _ = load_generator(d, "cpu")
    z = torch.cat([sample_latents(g, min(512, n - start), 50, generator=torch.Generator().manual_seed(i))
                   for i, start in enumerate(range(0, n, 512))])
    print(d, round(frechet_distance(z, a), 2))
