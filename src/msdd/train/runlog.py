"""What a training run reports as it goes: `RunLog` (log.jsonl and TensorBoard events in the run directory,
continued from a checkpoint's step on resume) and `Throughput` (images per second between log lines)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from msdd.io import atomic_write_text


class Throughput:
    """Images per second over the last logging window."""

    def __init__(self) -> None:
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        r = self.n / dt if dt > 0 else 0.0
        self.t0, self.n = time.perf_counter(), 0
        return r


def read_log(path: Path, max_step: float) -> list[str]:
    """Lines of log.jsonl up to `max_step` (a line cut short by a killed process is dropped)."""
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)["step"] <= max_step:
                keep.append(line + "\n")
    return keep


class RunLog:
    """log.jsonl (one JSON line per logged step) and TensorBoard scalars under `prefix/` in `run_dir`, written by
    the main process only."""

    def __init__(self, run_dir: Path, prefix: str) -> None:
        self.path, self.prefix = run_dir / "log.jsonl", prefix
        self._writer, self._purge_step = None, None

    def continue_from(self, step: int) -> None:
        """The run goes on from `step` (0: a new run): log.jsonl keeps its lines up to it, rewritten atomically (a
        run killed before its first checkpoint left lines of steps it will log again); TensorBoard hides the events
        after it."""
        self._purge_step = step + 1
        if self.path.exists():
            atomic_write_text(self.path, "".join(read_log(self.path, step)))

    def last(self) -> dict:
        """The metrics of the last step in log.jsonl ({} before the first line)."""
        lines = read_log(self.path, float("inf")) if self.path.exists() else []
        return {k: v for k, v in json.loads(lines[-1]).items() if k != "step"} if lines else {}

    def write(self, step: int, out: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when logging starts

            self._writer = SummaryWriter(str(self.path.parent / "tb"), purge_step=self._purge_step)
        for k, v in out.items():
            self._writer.add_scalar(f"{self.prefix}/{k}", v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **out}) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
