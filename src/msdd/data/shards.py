"""WebDataset tar shards: `data.source = "/data/shards/train-{000000..000099}.tar"`.

The format is WebDataset's (https://github.com/webdataset/webdataset): each shard is a tar file, and
the files of one sample share a key (`n01440764_10026.jpg`, `n01440764_10026.cls`). The first file
with an image extension is the sample's image; other files are ignored. Shards are read with the
`webdataset` package (`pip install msdd[webdataset]`); decoding, bad-image handling and the ADM crop
are the folder dataset's, so a record is the same `(tensor or None, name, reason or None)`.

Order: every epoch the shard list is shuffled with (seed, epoch); process k of n takes every n-th
shard, DataLoader worker w of W every W-th of those; each worker streams its shards through a
shuffle buffer of undecoded samples (seeded by seed, epoch, rank, worker). Processes may read
different numbers of samples per epoch; that is harmless because the training loop never waits for
an epoch to end (it just starts the next one on that process).

Resume: the loop tells the dataset how many batches this process took from the epoch. The DataLoader
takes batches from its workers in turn, so each worker knows how many of its records were used and
skips them *without decoding* (reading the tar bytes is the only cost); as the restarted DataLoader begins at
its worker 0, the workers' streams are rotated by the batches done. This continues exactly as
long as every worker still had data at the checkpoint; once some worker has run dry, the round-robin is
broken and the resumed epoch repeats or misses samples. With equal, clean shards that happens only in the
tail of an epoch; a worker holding an empty, truncated or short shard runs dry early, and then most of the
epoch resumes differently (measured: losses apart by up to 0.12 after such a resume). data.num_workers=0
resumes exactly in every case. We chose
this over restarting the epoch (which repeats up to a whole epoch per pre-emption) and over shard
boundaries (which repeat up to a shard per worker).
"""

from __future__ import annotations

import itertools
import math
import random
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from msdd.data.folder import IMAGE_EXTENSIONS, Record, crop_record
from msdd.data.images import BadImageError, load_image

SHUFFLE_BUFFER = 256  # undecoded samples per worker (a few MB of JPEGs)
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def is_shard_source(source: str) -> bool:
    return source.endswith(".tar")


def expand_shards(source: str) -> list[str]:
    from webdataset.shardlists import expand_urls  # optional dependency: imported only for tar sources

    return list(expand_urls(source))


class TarShardDataset(IterableDataset):
    """Training records from WebDataset tar shards, split over processes and DataLoader workers.

    `limit` caps the samples per epoch over all processes (for quick runs). `min_size` as in
    `ImageFolderDataset`: shorter images are skipped, those between min_size and resolution upscaled.
    """

    def __init__(self, source: str, resolution: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 min_size: int | None = None, limit: int | None = None) -> None:
        try:
            self.shards = expand_shards(source)
        except ImportError:
            raise ImportError("tar shards need the webdataset package: pip install 'msdd[webdataset]'") from None
        missing = [s for s in self.shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
        if missing:  # checked here, before any training work
            raise ValueError(f"data.source={source!r}: {len(missing)} of its {len(self.shards)} shard file(s) do not "
                             f"exist (first: {missing[0]}); check the path and the brace pattern, e.g. "
                             f"/data/train-{{000000..000099}}.tar")
        if len(self.shards) < world_size:
            raise ValueError(f"data.source={source!r} has {len(self.shards)} shard(s), fewer than the {world_size} "
                             f"processes; every process needs at least one shard: write more, smaller shards")
        self.resolution, self.seed, self.rank, self.world_size = resolution, seed, rank, world_size
        self.min_size = resolution // 2 if min_size is None else min_size
        self.limit = limit
        self.epoch, self.batches_done, self.batch_size = 0, 0, 1

    def set_epoch(self, epoch: int, batches_done: int = 0, batch_size: int = 1) -> None:
        """Start `epoch` after `batches_done` batches of `batch_size` that this process already took."""
        self.epoch, self.batches_done, self.batch_size = epoch, batches_done, batch_size

    def _raw_samples(self, shards: list[str]) -> Iterator[tuple[str, bytes | None, str | None]]:
        """(name, image bytes or None, why not) for every sample of `shards`, in order."""
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        for url in shards:
            n = 0
            try:
                with gopen(url) as stream:
                    files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
                    for sample in group_by_keys(files):
                        n += 1
                        name = f"{url}:{sample['__key__']}"
                        ext = next((k for k in sample if k.lower().endswith(IMAGE_SUFFIXES)), None)
                        if ext is None:
                            files = sorted(k for k in sample if not k.startswith("__"))
                            yield name, None, f"no image file in the sample (has {files})"
                        else:
                            yield name, sample[ext], None
            except (OSError, tarfile.TarError, ValueError) as e:  # missing, truncated, corrupt: skip the rest
                why = str(e.args[0]).split(" @ ")[0] if e.args else ""  # webdataset appends the stream to args
                yield url, None, f"shard unreadable after {n} samples ({type(e).__name__}: {why})"

    def __iter__(self) -> Iterator[Record]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader takes batches from its workers in turn and starts again at worker 0 after a resume:
        # loader worker w continues the stream of worker `worker`, the one that made batch batches_done + w
        worker = (loader_worker + self.batches_done) % workers
        order = random.Random(f"{self.seed}-{self.epoch}").sample(self.shards, len(self.shards))
        mine = order[self.rank :: self.world_size][worker::workers]
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        skip = len(range(worker, self.batches_done, workers)) * self.batch_size  # records already used
        cap = None if self.limit is None else math.ceil(self.limit / (self.world_size * workers))
        for n, item in enumerate(itertools.islice(_shuffled(self._raw_samples(mine), rng), cap)):
            if n >= skip:
                yield self._decode(*item)

    def _decode(self, name: str, data: bytes | None, reason: str | None) -> Record:
        if data is None:
            return None, name, reason
        try:
            arr = load_image(data, name)
        except BadImageError as e:
            return None, name, e.reason
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(name.encode())])
        return crop_record(arr, name, self.resolution, self.min_size, rng)


def _shuffled(items, rng: random.Random, size: int = SHUFFLE_BUFFER):
    """`items` in a random order, through a buffer of `size`: deterministic given rng's seed."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer
