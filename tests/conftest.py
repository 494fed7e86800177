"""Shared fixtures: tiny configs (a few channels, 32 px) and a small folder of real photo crops.

Tests over ~10 s on 2 CPU cores (torchrun subprocesses, torch.compile, killed and resumed runs, training to a goal,
the demo's shipped column) are marked `slow` (declared in pyproject.toml); `pytest -m "not slow"` leaves them out for a
quick run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import msdd
from msdd.config import load_config

# Subprocesses (the command line, torchrun, fresh interpreters) import the msdd these tests import, not whichever one
# the environment has installed: a second checkout, or a copy of the tree under test, is then tested whole.
SOURCE = str(Path(msdd.__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join([SOURCE, *filter(None, [os.environ.get("PYTHONPATH")])])

TINY_PRESET = "tiny-test"  # a 32 px toy tiny-64 (configs/tiny-test.yaml), also `msdd fidelity --quick`'s
# Short runs on top of it: 3 stages of 2 steps, a 200-step schedule with frequent logs and checkpoints, and
# a small PCA fit for the linear path.
TINY = [
    "model.flow.num_stages=3", "model.sampling.steps=[2,2,2]", "train.warmup_steps=5", "train.max_steps=200",
    "train.log_every=5", "train.ckpt_every=10", "train.grid_every=1000", "train.pca_crops=300",
]


def tiny_config(*extra: str, stages: int | None = None):
    over = list(TINY)
    if stages is not None:
        over += [f"model.flow.num_stages={stages}", f"model.sampling.steps={[2] * stages}"]
    return load_config(TINY_PRESET, over + list(extra))


def tiny_args(*extra: str) -> list[str]:
    """The command-line arguments (`--preset`, `--set ...`) of `tiny_config(*extra)`."""
    return ["--preset", TINY_PRESET, *[a for o in (*TINY, *extra) for a in ("--set", o)]]


def straight_and_resumed(make, root: Path, steps: int = 4):
    """The trainer `make(run_dir, require_resume=...)` run `steps` steps straight in root/a, and in root/b run half of
    them, rebuilt from its checkpoint (resume required) and run to the end: (straight, resumed)."""
    straight = make(root / "a", require_resume=False)
    straight.fit(max_steps=steps, progress=False)
    make(root / "b", require_resume=False).fit(max_steps=steps // 2, progress=False)
    resumed = make(root / "b", require_resume=True)
    assert resumed.step == steps // 2
    resumed.fit(max_steps=steps, progress=False)
    return straight, resumed


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """`a` and `b` hold the same tensors under the same names (a saved model and the module it was saved from)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_grid_shows(path: Path, columns: list[torch.Tensor], size: int, pad: int = 2) -> None:
    """The grid PNG at `path` (`msdd.eval.grid.save_grid`) holds `columns` (each (N, 3, size, size) in [-1, 1]), one
    image a row, under its row of labels: every panel within half a level of 255, and no row more."""
    from msdd.eval.grid import HEADER

    grid = np.asarray(Image.open(path)).astype(np.float64)
    rows = len(columns[0])
    assert grid.shape == (HEADER + pad + rows * (size + pad), pad + len(columns) * (size + pad), 3)
    for j, want in enumerate(columns):
        for i in range(rows):
            y, x = HEADER + pad + i * (size + pad), pad + j * (size + pad)
            pixels = (want[i].permute(1, 2, 0).numpy() + 1) / 2 * 255
            assert np.abs(grid[y:y + size, x:x + size] - pixels).max() <= 0.51, (j, i)


def random_vgg16_file(path: Path) -> Path:
    """A torchvision VGG16 state dict at `path` with random features (LPIPS uses them) and a zero classifier (it does
    not): an LPIPS network that runs offline, for tests of how a loss uses it, not of its values."""
    import torchvision

    with torch.device("meta"):  # the shapes only: torchvision's initialisation of 138M weights takes 10 s
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(v, generator=g) * 0.05 if k.startswith("features") else torch.zeros(v)
                for k, v in shapes.items()}, path)
    return path


def assert_training_loss_follows_a_setting(make_tokenizer, values, loss_by_hand) -> None:
    """For each value, `make_tokenizer(value)` (built under seed 0) gives `training_loss` equal to `loss_by_hand(tok,
    images, perceptual, generator)` from the same draws, and the values give as many different losses: a setting
    dropped on its way to the loss, or passed as a constant, is seen. LPIPS is a stand-in: the mean absolute error
    per image."""
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def perceptual(x, y):
        return (x - y).abs().flatten(1).mean(1)

    losses = []
    for value in values:
        torch.manual_seed(0)
        tok = make_tokenizer(value)
        loss, _ = tok.training_loss(images, torch.Generator().manual_seed(2), perceptual=perceptual)
        want = loss_by_hand(tok, images, perceptual, torch.Generator().manual_seed(2))
        torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
        losses.append(loss.item())
    assert len(set(losses)) == len(values), losses


def assert_same_runs(run_a: Path, run_b: Path, keys: tuple[str, ...], modules: dict) -> None:
    """Two runs that should have trained alike (one straight, one stopped and resumed): the same values of `keys`
    in every line of their log.jsonl, and identical state dicts for every name of `modules` ((module a, module b))."""

    def logged(run):
        return [{k: v for k, v in json.loads(line).items() if k in keys} for line in open(Path(run) / "log.jsonl")]

    assert logged(run_a) == logged(run_b)
    for name, (a, b) in modules.items():
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(autouse=True, scope="session")
def _pca_cache(tmp_path_factory):
    """PCA baselines: a per-session cache (not the user's) and a small fit (600 crops, not 20,000)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MSDD_CACHE", str(tmp_path_factory.mktemp("msdd-cache")))
    mp.setenv("MSDD_PCA_CROPS", "600")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def photo_folder(tmp_path):
    """Six real photo crops (from the embedded photos) saved as PNG/JPEG files."""
    from msdd.data import load_photo

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["coffee", "astronaut", "china"]):
        arr = load_photo(name)
        for j, (y, x) in enumerate([(0, 0), (100, 150)]):
            crop = np.ascontiguousarray(arr[y : y + 96, x : x + 96])
            ext = "png" if j == 0 else "jpg"
            Image.fromarray(crop).save(root / ("sub" if i == 2 else ".") / f"{name}_{j}.{ext}")
    return root
