"""Test helper run under torchrun by test_robust.py: what `msdd gen-train` does before training (the shipped
tokenizer encodes the generator's training images, each process its share), then every process dumps the whole
set it got and how many images it encoded itself (DUMP/rank<k>.safetensors).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_encode.py SOURCE DUMP BATCH_SIZE NUM_CLASSES
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from msdd.dist import cleanup, setup
from msdd.generator.config import GenDataConfig
from msdd.generator.data import encode_latents
from msdd.tokenizer import Tokenizer

source, dump, batch_size, num_classes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
info = setup("cpu")[0]
tok = Tokenizer.from_pretrained()
encoded = []  # the batch size of each call of `tok.encode` in this process
encode = tok.encode
tok.encode = lambda x, **kw: encoded.append(len(x)) or encode(x, **kw)
data = encode_latents(tok, GenDataConfig(source=source), seed=0, num_classes=num_classes, batch_size=batch_size,
                      rank=info.rank, world=info.world_size)
dump.mkdir(parents=True, exist_ok=True)
labels = {} if data.labels is None else {"labels": data.labels}
save_file({"latents": data.latents, **labels, "encoded": torch.tensor(encoded)},
          str(dump / f"rank{info.rank}.safetensors"))
cleanup()
