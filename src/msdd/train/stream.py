"""The training data order: a shuffled, resumable index order split across processes
(`ResumableSampler`) and the endless batch stream over epochs whose position a checkpoint stores
(`BatchStream`)."""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from msdd.seeding import derived_seed


class ResumableSampler(Sampler[int]):
    """A shuffled index order per epoch that can start mid-epoch and be split across processes.

    Epoch e's order is a permutation drawn from (seed, e), cut into global batches of `batch`
    indices (the rest of the epoch is dropped); rank k of n takes the k-th of the n equal contiguous
    parts of every global batch. The position (indices already consumed by this rank) is all a
    checkpoint needs to continue exactly. `batch` defaults to n (rank k takes every n-th index)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, batch: int | None = None) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.batch = world_size if batch is None else batch
        if self.batch % world_size:
            raise ValueError(f"a global batch of {self.batch} cannot be split evenly over {world_size} processes; "
                             "make the batch size a multiple of the number of processes")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        perm = torch.randperm(self.size, generator=g)
        steps, share = self.size // self.batch, self.batch // self.world_size
        return perm[: steps * self.batch].view(steps, self.world_size, share)[:, self.rank].flatten().tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def dropped(self) -> list[int]:
        """The indices epoch `epoch` leaves out on every process (the rest of its last global batch)."""
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return torch.randperm(self.size, generator=g)[self.size // self.batch * self.batch :].tolist()

    def __len__(self) -> int:
        return max(0, self.size // self.batch * (self.batch // self.world_size) - self.start)


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which saves and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchStream:
    """Endless batches over epochs with a resumable position: (epoch, batches taken this epoch).

    Map-style datasets are ordered by `sampler`; an IterableDataset (tar shards) orders and splits
    itself and is told the position through `set_epoch(epoch, batches_done, batch_size)`.

    Batches are `collate_skip_bad` triples. `dry` becomes True once a whole pass over this process's data
    (a full epoch, and for a map-style dataset also the images the epoch left out) gave not one usable
    image, and False again at the next usable one; `example` is the last skipped (path, reason). A folder of
    unreadable files would otherwise give empty batches forever: the loop stops when every process is dry."""

    def __init__(self, dataset, batch_size: int, sampler: ResumableSampler | None, collate_fn,
                 num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.epoch, self.batches_in_epoch = 0, 0
        self.dry, self.example, self._dry_batches = False, None, 0  # _dry_batches: in a row, without an image
        self._it = None
        if sampler is not None and len(sampler) < batch_size:
            raise ValueError(f"the training set has {sampler.size} images, fewer than one global batch of "
                             f"{sampler.batch}; lower the batch size or add images")

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        self._it = None

    def _start_epoch(self) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, self.batches_in_epoch * self.batch_size)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        else:
            self.dataset.set_epoch(self.epoch, self.batches_in_epoch, self.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                            collate_fn=self.collate_fn, num_workers=self.num_workers,
                            worker_init_fn=_ignore_signals if self.num_workers else None)
        self._it = iter(loader)

    def __next__(self):
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
                self.batches_in_epoch += 1
                if len(batch[0]):
                    self.dry, self._dry_batches = False, 0
                else:
                    self._dry_batches += 1
                    self.example = batch[2][0] if batch[2] else self.example
                return batch
            except StopIteration:
                if self.batches_in_epoch == 0:  # would loop forever
                    raise ValueError(f"the training data gives this process not one full batch of "
                                     f"{self.batch_size} per epoch; add data or lower the batch size") from None
                # a whole epoch without an image (a resumed one counts only once seen from its start)
                if self._dry_batches >= self.batches_in_epoch and not self._dropped_usable():
                    self.dry = True
                self.epoch, self.batches_in_epoch, self._it = self.epoch + 1, 0, None

    def _dropped_usable(self) -> bool:
        """Whether an image the epoch left out (drop_last) is usable: a dataset whose few good images all fell
        there is not yet known to be unusable."""
        if self.sampler is None:
            return False
        return any(self.dataset[i][0] is not None for i in self.sampler.dropped())

    def __iter__(self):
        return self
