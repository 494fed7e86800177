"""A latent generator for msdd tokenizers: a DiT/SiT-style flow-matching transformer over a tokenizer's
normalised latents, msdd's (L, C) tokens or SSDD's (c, h, w) grid, unconditional or class-conditional.

    config.py  `GeneratorConfig` (the network), `GenRunConfig` (+ train, data), presets gen-tiny / gen-xl
    model.py   `LatentDiT`, `build_generator`, FLOPs per forward (`generator_flops`) and per sampling
    flow.py    the flow-matching loss, the Euler sampler with guidance (`sample_latents`), `generate(_images)`
    files.py   a generator directory (save / load), sample PNGs and grids
    data.py    the training images encoded once into latents (+ class labels)
    train.py   `GeneratorTrainer` (`msdd gen-train`) on the shared training loop

    model = build_generator(load_gen_config("gen-tiny").generator, tok.config.latent_shape)
    images = generate_images(model, tok, n=16, steps=50, guidance=1.0, generator=torch.Generator().manual_seed(0))
"""

from msdd.generator.config import PRESETS, GeneratorConfig, GenRunConfig, load_gen_config
from msdd.generator.files import load_generator, save_generator
from msdd.generator.flow import Generated, flow_matching_loss, generate, generate_images, sample_latents
from msdd.generator.model import LatentDiT, build_generator, generator_flops, passes_per_step, sampling_flops

__all__ = [
    "PRESETS", "GenRunConfig", "Generated", "GeneratorConfig", "LatentDiT", "build_generator", "flow_matching_loss",
    "generate", "generate_images", "generator_flops", "load_gen_config", "load_generator", "passes_per_step",
    "sample_latents", "sampling_flops", "save_generator",
]
