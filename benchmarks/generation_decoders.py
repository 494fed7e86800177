"""Does the distilled decoder keep generation quality? The same generated latents decoded by the shipped tiny-64
student (one step per stage) and by its teacher (the teacher's own schedule), compared with data crops.

Offline there is no Inception network (FID is added when its file resolves, see `msdd eval --help`), so the
images are compared in two spaces that need no pretrained network, each beside its floor (as many other data
crops against the data) and beside N(0, I) latents decoded by the student:

- thumbnail FD: Frechet distance of 8 x 8 average-pooled RGB images (192 dims): colour and layout;
- re-encoded latent FD: the images encoded again by the tokenizer's encoder (shared by student and teacher),
  normalised, against the data's latents: what the tokenizer itself sees of the images.

Also the PSNR between the student's and the teacher's decodes of the same latents, and seconds per image.

    python benchmarks/generation_decoders.py GENERATOR_DIR [N] [--json OUT] [--inception-weights FILE]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from msdd.eval.metrics import psnr_per_image
from msdd.generator import load_generator, sample_latents
from msdd.generator.quality import data_images, fid_against, frechet_distance, normalised_latents
from msdd.tokenizer import Tokenizer


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def decode(tok: Tokenizer, z: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = torch.cat([tok.decode(tok.denormalize_latents(z[i:i + 128]), seed=seed + i)
                        for i in range(0, len(z), 128)])
    return images.clamp(-1, 1), (time.perf_counter() - start) / len(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("generator")
    parser.add_argument("n", type=int, nargs="?", default=1024)
    parser.add_argument("--json")
    parser.add_argument("--inception-weights")
    args = parser.parse_args()
    torch.manual_seed(0)
    student, teacher = Tokenizer.from_pretrained("tiny-64"), Tokenizer.from_pretrained("tiny-64-teacher")
    generator, _ = load_generator(args.generator, "cpu")
    n = args.n
    data = data_images("embedded", 2 * n, 64, seed=1)
    data, other = data[:n], data[n:]
    with torch.no_grad():
        z = torch.cat([sample_latents(generator, 256, 50, generator=torch.Generator().manual_seed(i))
                       for i in range(0, n, 256)])[:n]
        rows, decoded = {}, {}
        for name, tok, latents in (("data (floor)", None, None), ("student", student, z), ("teacher", teacher, z),
                                   ("student, N(0, I) latents", student, torch.randn(z.shape))):
            images, seconds = (other, None) if tok is None else decode(tok, latents, seed=10_000)
            decoded[name] = images
            rows[name] = {"thumbnail_fd": frechet_distance(thumbnails(images), thumbnails(data)),
                          "reencoded_latent_fd": frechet_distance(normalised_latents(student, images),
                                                                  normalised_latents(student, data)),
                          "fid": fid_against(images, data, args.inception_weights), "seconds_per_image": seconds}
        psnr = psnr_per_image(decoded["student"], decoded["teacher"]).mean().item()
    out = {"command": "python benchmarks/generation_decoders.py " + args.generator + f" {n}", "samples": n,
           "generator_steps": 50, "student_vs_teacher_psnr_db": psnr, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
