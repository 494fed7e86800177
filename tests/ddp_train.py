"""Test helper run under torchrun by test_robust.py: what `msdd train` does with the tiny test config,
then every process dumps the weights it holds and its summary (DUMP/rank<k>.safetensors / .json), so
the test can check that all processes hold the same model.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py RUN DUMP STEPS \
        [--poison-null-on RANK] [--sigterm-on RANK] [--teacher DIR] [KEY=VALUE ...]

--poison-null-on RANK: that process's null context (used for samples dropped for guidance) becomes NaN,
so it alone sees a non-finite loss on some steps; every process must skip those steps together.
--sigterm-on RANK: that process sends itself SIGTERM during step 2 (a pre-emption of one process).
--teacher DIR: what `msdd distill` does instead (stage 2 of that teacher); the dump holds the student's weights and the
discriminator's (`disc.` keys).
"""

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import tiny_config
from msdd.dist import cleanup
from msdd.train.distill import Distiller
from msdd.train.stage1 import Stage1Trainer

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("dump")
parser.add_argument("steps", type=int)
parser.add_argument("--poison-null-on", type=int, default=None)
parser.add_argument("--sigterm-on", type=int, default=None)
parser.add_argument("--teacher", default=None)
parser.add_argument("overrides", nargs="*")
args = parser.parse_intermixed_args()  # options among the KEY=VALUE overrides

if args.teacher is None:
    trainer = Stage1Trainer(tiny_config(*args.overrides), args.run_dir)
else:
    trainer = Distiller(tiny_config(*args.overrides), args.teacher, args.run_dir)
rank = trainer.dist.rank
if rank == args.poison_null_on:
    with torch.no_grad():
        trainer.tok.decoder.null_context.fill_(float("nan"))
if rank == args.sigterm_on:
    step_once = trainer.micro_step

    def micro_step(images, generator):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_once(images, generator)

    trainer.micro_step = micro_step
summary = trainer.fit(max_steps=args.steps, progress=False)
dump = Path(args.dump)
dump.mkdir(parents=True, exist_ok=True)
if args.teacher is None:
    state = trainer.tok.state_dict()
else:
    state = {**trainer.student.state_dict(), **{f"disc.{k}": v for k, v in trainer.disc.state_dict().items()}}
if args.poison_null_on is not None:  # NaN on one process by construction
    del state["decoder.null_context"]
save_file(state, str(dump / f"rank{rank}.safetensors"))
(dump / f"rank{rank}.json").write_text(json.dumps({k: summary[k] for k in ("steps", "skipped_steps", "interrupted")}))
cleanup()
