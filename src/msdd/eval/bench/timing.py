"""Timing the contenders side by side: warm-up rounds, then rounds in an order rotated by one place per round,
the device synchronised around every call; a timed sample repeats a short call until it lasts `min_time`."""

from __future__ import annotations

import sys
import time
from typing import Callable, NamedTuple, Sequence

import torch

from msdd.eval.bench.memory import call_with_peak_memory
from msdd.tokenizer import autocast, synchronize


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rotated_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The run order of each round: round r starts r places further along, so over len(names) rounds
    every contender runs once in every position."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]


def synchronizer(device: torch.device) -> Callable[[], None]:
    return lambda: synchronize(device)


class Timings(NamedTuple):
    """What `time_contenders` measured, per contender: seconds per call of each timed round, seconds of its first
    call, peak MiB of its sample in the last round beyond the memory in use before it (None where not measurable),
    and the machine's matmul GFLOP/s probed right after each of its timed samples (empty without a probe)."""

    seconds: dict[str, list[float]]
    first: dict[str, float]
    memory: dict[str, float | None]
    peaks: dict[str, list[float]]


def time_contenders(decoders: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device,
                    bf16: bool = False, log: Callable[[str], None] = log_stderr, min_time: float = 0.0,
                    probe: Callable[[], float] | None = None) -> Timings:
    """Every contender timed: `warmup` untimed rounds of one call each, then `rounds` timed rounds in rotated order, in
    which a contender's sample is its calls back to back until they last `min_time` seconds (at least one call) and its
    time per call their mean: throughput is what calls back to back sustain, and a single short call after a pause
    runs slower, as the core comes back from whatever ran before it (benchmarks/README.md, "How"). `probe` (GFLOP/s
    now), where given, runs after each timed sample, outside it: the machine's peak beside each sample, since it moves
    within a run."""
    sync = synchronizer(device)

    def timed(fn: Callable[[], object], least: float = 0.0) -> float:
        sync()
        t0 = time.perf_counter()
        calls = 0
        while True:
            fn()
            sync()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= least:
                return elapsed / calls

    names = list(decoders)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, float] = {}
    memory: dict[str, float | None] = {}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode(), autocast(device, bf16):
        for i, order in enumerate(rotated_orders(names, warmup)):
            for name in order:
                t = timed(decoders[name])
                first.setdefault(name, t)
            log(f"  warm-up {i + 1}/{warmup} done")
        for i, order in enumerate(rotated_orders(names, rounds)):
            for name in order:
                if i == rounds - 1:  # the memory probe stays outside the timed region
                    t, memory[name] = call_with_peak_memory(lambda: timed(decoders[name], min_time), device)
                else:
                    t = timed(decoders[name], min_time)
                first.setdefault(name, t)
                seconds[name].append(t)
                if probe is not None:
                    peaks[name].append(probe())
            log(f"  round {i + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in order))
    return Timings(seconds, first, memory, peaks)
