"""Images of any size: tiles, blending, `Tokenizer.reconstruct` at the input's size, `msdd reconstruct
--keep-size / --crop / --skip-existing` (issue 17)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_grid_shows, tiny_config
from msdd.cli import main
from msdd.data import load_image, load_photo, to_tensor
from msdd.models.precision import int8_engine, msdd_int8
from msdd.tiles import _pad_to, ramp_weights, reconstruct_tiled, seam_mask, tile_starts
from msdd.tokenizer import Tokenizer


def test_tiles_cover_with_the_overlap_and_weights_sum_to_one():
    assert tile_starts(150, 64, 16) == [0, 43, 86]  # 3 tiles: stride 43 <= 64 - 16, the last ends at 150
    assert tile_starts(64, 64, 16) == [0] and tile_starts(112, 64, 16) == [0, 48]
    for overlap in (33, 63, 64):  # 63: a tile per pixel
        with pytest.raises(ValueError, match=r"tile_overlap must be a whole number of pixels in \[0, 32\] \(at most"):
            tile_starts(100, 64, overlap)
    for length, overlap in [(150, 16), (250, 8), (113, 0), (1000, 31)]:
        starts = tile_starts(length, 64, overlap)
        assert starts[0] == 0 and starts[-1] + 64 == length
        assert all(a + 64 - b >= overlap for a, b in zip(starts, starts[1:]))
        total = torch.zeros(length)
        for s, w in zip(starts, ramp_weights(starts, 64)):
            total[s:s + 64] += w
        assert torch.allclose(total, torch.ones(length)), (length, overlap)  # a partition of unity
    assert seam_mask(150, 64, 64, 16)[:, 0].tolist() == [43 <= y < 64 or 86 <= y < 107 for y in range(150)]


@pytest.fixture(scope="module")
def student():
    return Tokenizer.from_pretrained("tiny-64-student")


def test_any_size_comes_back_at_its_size_without_seams(student):
    photo = torch.from_numpy(np.ascontiguousarray(load_photo("astronaut")[100:250, 50:300])).permute(2, 0, 1)
    out = student.reconstruct(photo[None])  # uint8 (1, 3, 150, 250): not the model's 64 x 64
    assert out.shape == (1, 3, 150, 250)
    real = photo.float() / 127.5 - 1
    assert 10 * torch.log10(4 / (out[0] - real).pow(2).mean()) > 20  # the photo, not noise
    # every tile decoded on its own generator: the number decoded together does not matter
    assert (student.reconstruct(photo[None], batch_size=5) - out).abs().max() <= 2 / 255
    # a constant image: the overlap bands are no worse than the tile interiors (no visible seam)
    flat = torch.full((1, 3, 150, 250), 0.3)
    err = (student.reconstruct(flat)[0] - flat[0]).abs().mean(0)
    band = seam_mask(150, 250, 64, 16)
    assert err[band].mean() <= err[~band].mean() + 1 / 255
    # a side shorter than the model: padded by reflection, cropped back; PIL images keep their sizes
    assert student.reconstruct(torch.zeros(2, 3, 40, 100), tile_overlap=8).shape == (2, 3, 40, 100)
    pils = [Image.fromarray(load_photo("coffee")[:70, :90]), Image.fromarray(load_photo("coffee")[:64, :64])]
    assert [tuple(x.shape) for x in student.reconstruct(pils, tile_overlap=16)] == [(3, 70, 90), (3, 64, 64)]
    assert student.reconstruct(pils[1:]).shape == (1, 3, 64, 64)  # without tile_overlap: centre crop, as before
    with pytest.raises(ValueError, match="float images must be in"):
        student.reconstruct(torch.full((1, 3, 80, 80), 2.0))


def test_every_image_and_key_draws_its_own_tile_noise(student):
    """Tile noise is seeded from the image's key and the tile index: two copies of one image in a batch are decoded
    with different noise (as the images of a batch are in `decode`), image i of a batch with key i, and the same key
    gives the same reconstruction."""
    photo = torch.from_numpy(np.ascontiguousarray(load_photo("astronaut")[:80, :100])).permute(2, 0, 1)
    x = photo.float() / 127.5 - 1
    a = reconstruct_tiled(student, x, 16, key="a")
    assert torch.equal(reconstruct_tiled(student, x, 16, key="a"), a)
    assert (reconstruct_tiled(student, x, 16, key="b") - a).abs().max() > 4 / 255
    both = student.reconstruct(torch.stack([x, x]), tile_overlap=16)
    assert torch.equal(both[1], reconstruct_tiled(student, x, 16, key=1))
    assert (both[0] - both[1]).abs().max() > 4 / 255


def test_a_tiled_reconstruction_is_the_ramp_weighted_blend_of_its_tiles(student):
    """Rebuilt by hand: each 64 px tile of a 100 x 164 photo reconstructed with the generator of its key and index,
    weighted by the product of its row's and column's ramps, summed. The default overlap is a quarter tile
    (16 px; at 12 px, for one, 3 tiles would span the 164 px width)."""
    from msdd.seeding import image_generators

    photo = torch.from_numpy(np.ascontiguousarray(load_photo("astronaut")[:100, 60:224])).permute(2, 0, 1)
    x = photo.float() / 127.5 - 1
    out = student.reconstruct(x[None], seed=3)[0]
    assert torch.equal(student.reconstruct(x[None], seed=3, tile_overlap=16)[0], out)  # 64 // 4
    ys, xs = tile_starts(100, 64, 16), tile_starts(164, 64, 16)
    assert (ys, xs) == ([0, 36], [0, 33, 67, 100])
    wy, wx = ramp_weights(ys, 64), ramp_weights(xs, 64)
    gens = image_generators(3, [f"0#tile{k}" for k in range(len(ys) * len(xs))])
    want, k = torch.zeros(3, 100, 164), 0
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            tile = x[None, :, y:y + 64, x0:x0 + 64]
            want[:, y:y + 64, x0:x0 + 64] += student.decode(student.encode(tile), generator=gens[k])[0] * (
                wy[i][:, None] * wx[j][None, :])
            k += 1
    assert (out - want.clamp(-1, 1)).abs().max() < 1e-5
    # no seed: seed 0; decode's options reach every tile (two Euler steps a stage for this one-step student)
    assert torch.equal(student.reconstruct(x[None])[0], reconstruct_tiled(student, x, key=0, seed=0))
    with pytest.warns(UserWarning, match="distilled for one step per stage"):
        two = student.reconstruct(x[None], seed=3, steps=2)[0]
        assert torch.equal(two, reconstruct_tiled(student, x, key=0, seed=3, steps=2))
    assert (two - out).abs().max() > 4 / 255


def test_short_sides_are_padded_by_reflection_or_else_by_repeating_the_edge():
    """What the tiles of an image with a side under the model's see beyond it: its reflection, where the side is
    long enough to reflect, else its edge repeated; an image of at least the tile size is not padded."""
    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    padded = _pad_to(x, 64)
    assert padded.shape == (3, 64, 64) and torch.equal(padded[:, :40, :50], x)
    assert torch.equal(padded[:, 40:, :50], x.flip(1)[:, 1:25])  # row 40 + k mirrors row 38 - k
    assert torch.equal(padded[:, :40, 50:], x.flip(2)[:, :, 1:15])
    thin = x[:, :3]  # 3 rows: too few to reflect 61 more
    assert torch.equal(_pad_to(thin, 64)[:, 3:, :50], thin[:, 2:3].expand(3, 61, 50))
    half = x[:, :32]  # 32 rows: 32 more would reflect row 32, which it does not have
    assert torch.equal(_pad_to(half, 64)[:, 32:, :50], half[:, 31:32].expand(3, 32, 50))
    wide = torch.rand(3, 3, 100, generator=torch.Generator().manual_seed(1))  # wide enough, too few rows
    assert torch.equal(_pad_to(wide, 64), torch.cat([wide, wide[:, 2:3].expand(3, 61, 100)], 1))
    assert _pad_to(x, 32) is x


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path


def _read(path) -> torch.Tensor:
    """A PNG as (3, H, W) in [-1, 1], as the data pipeline reads it."""
    return to_tensor(load_image(path))


def _model_and_photos(tmp_path, tall: bool = True):
    """A random 32 px tiny model and a folder of crops of a photo: wider than the model, its size, taller."""
    model = tmp_path / "m"
    Tokenizer(tiny_config().model).save_pretrained(model)
    photos = tmp_path / "photos"
    china = load_photo("china")
    _write(photos / "wide.png", china[:40, :70]), _write(photos / "square.png", china[100:132, 100:132])
    if tall:
        _write(photos / "tall.png", china[:90, :50])
    return model, photos


def test_reconstruct_cli_decodes_with_the_guidance_asked_for(tmp_path):
    """`msdd reconstruct --cfg G` decodes with guidance G (recorded with the run's settings, which --skip-existing
    compares), the model's own without it."""
    model, photos = _model_and_photos(tmp_path, tall=False)
    for args, guidance in (([], Tokenizer.from_pretrained(model).resolve_guidance(None)), (["--cfg", "2.5"], 2.5)):
        out = tmp_path / f"rec{len(args)}"
        assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(out), *args]) == 0
        assert json.loads((out / "reconstruct.json").read_text())["guidance"] == guidance
    assert guidance != Tokenizer.from_pretrained(model).resolve_guidance(None)


def test_reconstruct_cli_sizes_and_skip_existing(tmp_path, capsys):
    model, photos = _model_and_photos(tmp_path)
    out = tmp_path / "rec"
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(out)]) == 0
    sizes = {p.name: Image.open(p).size for p in (out / "reconstructions").iterdir()}
    assert sizes == {"wide.png": (70, 40), "square.png": (32, 32), "tall.png": (50, 90)}
    first = {r["name"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert set(first) == {"wide", "square", "tall"}
    grid = np.asarray(Image.open(out / "grid.png"))  # 3 rows of 32 px under a row naming the 3 columns
    assert grid.shape == (14 + 3 * 34 + 2, 3 * 34 + 2, 3) and (grid[:14] < 128).any()  # (dark label text)
    crop = tmp_path / "crop"
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(crop), "--crop"]) == 0
    assert {Image.open(p).size for p in (crop / "reconstructions").iterdir()} == {(32, 32)}
    # a stopped run: one output missing, one truncated mid-write; --skip-existing redoes those two only
    (out / "reconstructions" / "wide.png").unlink()
    tall = (out / "reconstructions" / "tall.png").read_bytes()
    (out / "reconstructions" / "tall.png").write_bytes(tall[: len(tall) // 2])
    kept = (out / "reconstructions" / "square.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(out), "--skip-existing"]) == 0
    printed = capsys.readouterr().out
    assert "3 images reconstructed (0 skipped, 1 kept from an earlier run)" in printed and " s/image" in printed
    assert (out / "reconstructions" / "square.png").stat().st_mtime_ns == kept
    assert (out / "reconstructions" / "tall.png").read_bytes() == tall  # decoded again, the same image
    again = {r["name"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert again == first  # the kept PNG scores as it did when it was written
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(out), "--skip-existing"]) == 0
    printed = capsys.readouterr().out  # every PNG kept: no decode time (was "decode 0.000 s/image")
    assert "(0 skipped, 3 kept from an earlier run)" in printed and "none decoded again" in printed
    assert "s/image" not in printed
    # another model or seed: the PNGs are not this run's (was: "kept", scored as the other model's)
    for other in (["--model", "tiny-64-teacher"], ["--model", str(model), "--seed", "1"],
                  ["--model", str(model), "--steps", "1"]):
        assert main(["reconstruct", str(photos), *other, "--out", str(out), "--skip-existing"]) == 2
        assert "were made with other settings" in capsys.readouterr().err
    # a tiled file's noise follows its own name, not its place among the inputs (3rd in the folder, 1st alone), with
    # a model whose decode depends on the noise (the random one's zero output layer makes it the same for any noise)
    noisy = Tokenizer(tiny_config().model)
    torch.nn.init.normal_(noisy.decoder.final.linear.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    noisy.save_pretrained(tmp_path / "noisy")
    wide = {}
    for run, args in [("folder", [str(photos)]), ("alone", [str(photos / "wide.png")]),
                      ("seed 1", [str(photos / "wide.png"), "--seed", "1"])]:
        assert main(["reconstruct", *args, "--model", str(tmp_path / "noisy"), "--out", str(tmp_path / run)]) == 0
        wide[run] = (tmp_path / run / "reconstructions" / "wide.png").read_bytes()
    assert wide["alone"] == wide["folder"] != wide["seed 1"]
    (out / "reconstruct.json").unlink()
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(out), "--skip-existing"]) == 2
    assert "without a readable reconstruct.json" in capsys.readouterr().err
    assert main(["reconstruct", str(photos), "--model", str(model), "--tile-overlap", "17"]) == 2
    assert "--tile-overlap must be a whole number of pixels in [0, 16] (at most half a tile)" in capsys.readouterr().err


def test_reconstruct_cli_keeps_small_files_only_with_keep_size(tmp_path, capsys):
    """A file in a folder with a side under the model's 32 px: skipped with the fix named by the default size ("auto",
    which tiles only the files larger than the model) and by --crop; --keep-size pads and reconstructs it."""
    model, photos = _model_and_photos(tmp_path, tall=False)
    _write(photos / "small.png", load_photo("china")[:20, :40])
    for size in ([], ["--crop"]):
        with pytest.warns(UserWarning, match=r"small.png: 40x20 px is smaller than the model resolution 32.*--keep"):
            assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(tmp_path / "a"), *size]) == 0
        assert "2 images reconstructed (1 skipped" in capsys.readouterr().out
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(tmp_path / "k"), "--keep-size"]) == 0
    assert Image.open(tmp_path / "k" / "reconstructions" / "small.png").size == (40, 20)


@pytest.mark.skipif(int8_engine() is None, reason="this PyTorch build has no quantised CPU kernels")
def test_reconstruct_cli_int8(tmp_path, capsys):
    model, photos = _model_and_photos(tmp_path, tall=False)
    out = tmp_path / "rec"
    assert main(["reconstruct", str(photos), "--model", str(model), "--out", str(out), "--int8"]) == 0
    assert {p.name: Image.open(p).size for p in (out / "reconstructions").iterdir()} == {
        "wide.png": (70, 40), "square.png": (32, 32)}  # the tiled path and the batched one
    capsys.readouterr()
    both = ["reconstruct", str(photos), "--model", str(model), "--out", str(tmp_path / "rec2"), "--int8", "--bf16"]
    if msdd_int8():  # msdd's int8 kernel takes bf16 activations
        assert main(both) == 0 and len(list((tmp_path / "rec2" / "reconstructions").iterdir())) == 2
    else:  # torch.ao's int8 layers run in float32
        assert main(both) == 2 and "int8" in capsys.readouterr().err


def test_reconstruct_files_decodes_in_batches_and_reports_the_means_of_what_it_wrote(tmp_path, monkeypatch):
    """`reconstruct_files` on a folder of three 32 px crops, a wider photo and a corrupt file (batches of 2, a grid of
    2 rows): the squares are decoded in batches of 2 then 1, each PNG exactly `reconstruct_images` of its batch with
    its name's noise; the returned means are those of metrics.csv's rows, which score the PNGs; the corrupt file is
    skipped with load_image's reason; the grid shows the first two images; decode time is that of the decodes. A
    rerun without skip_existing decodes every image again (another seed: other PNGs)."""
    import time

    import msdd.eval.reconstruct_files as rf
    from msdd.data import BadImageError
    from msdd.eval.metrics import psnr_per_image, ssim_per_image
    from msdd.eval.reconstruct import reconstruct_images

    tok = Tokenizer(tiny_config().model)  # a decode that depends on its noise (a random final layer)
    torch.nn.init.normal_(tok.decoder.final.linear.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    china, photos = load_photo("china"), tmp_path / "photos"
    for name, (y, x) in {"a": (100, 100), "b": (150, 200), "c": (40, 300)}.items():
        _write(photos / f"{name}.png", china[y:y + 32, x:x + 32])
    _write(photos / "w.png", china[:40, :70])
    (photos / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(BadImageError) as bad:
        load_image(photos / "bad.png")
    batches, spent = [], []

    def timed(decode):  # the real decode, its batch sizes and seconds recorded
        def run(tok, images, *args, **kwargs):
            t0 = time.perf_counter()
            out = decode(tok, images, *args, **kwargs)
            spent.append(time.perf_counter() - t0)
            batches.append(len(images) if images.ndim == 4 else "tiled")
            return out
        return run

    monkeypatch.setattr(rf, "reconstruct_images", timed(reconstruct_images))
    monkeypatch.setattr(rf, "reconstruct_tiled", timed(reconstruct_tiled))
    files, names, explicit, keys = rf.list_inputs([photos])
    out = tmp_path / "rec"
    with pytest.warns(UserWarning, match="skipping .*bad.png"):
        res = rf.reconstruct_files(tok, files, names, explicit, out, seed=3, batch_size=2, grid_rows=2, keys=keys)
    assert batches == [2, "tiled", 1] and res["n"] == 4 and res["reused"] == 0
    assert res["skipped"] == [(str(photos / "bad.png"), bad.value.reason)]
    real = {n: _read(photos / f"{n}.png") for n in "abcw"}
    png = {n: _read(out / "reconstructions" / f"{n}.png") for n in "abcw"}
    by_hand = [reconstruct_images(tok, torch.stack([real[n] for n in batch]), seed=3, keys=list(batch))[0]
               for batch in ("ab", "c")]
    assert torch.equal(torch.cat(by_hand), torch.stack([png[n] for n in "abc"]))
    rows = {r["name"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert set(rows) == set("abcw")
    for n in "abcw":
        assert float(rows[n]["psnr_db"]) == pytest.approx(psnr_per_image(png[n][None], real[n][None]).item(), abs=6e-4)
        assert float(rows[n]["ssim"]) == pytest.approx(ssim_per_image(png[n][None], real[n][None]).item(), abs=6e-5)
    assert res["psnr"] == pytest.approx(np.mean([float(r["psnr_db"]) for r in rows.values()]), abs=6e-4)
    assert res["ssim"] == pytest.approx(np.mean([float(r["ssim"]) for r in rows.values()]), abs=6e-5)
    first, made = torch.stack([real["a"], real["b"]]), torch.stack([png["a"], png["b"]])
    assert_grid_shows(out / "grid.png", [first, made, ((made - first).abs() * 4 - 1).clamp(-1, 1)], 32)
    # skip_existing: "a" decoded again alone and "w" from its tiles, the others kept; decode seconds per image decoded
    (out / "reconstructions" / "a.png").unlink(), (out / "reconstructions" / "w.png").unlink()
    batches.clear(), spent.clear()
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="skipping"):
        res = rf.reconstruct_files(tok, files, names, explicit, out, seed=3, batch_size=2, grid_rows=2, keys=keys,
                                   skip_existing=True)
    wall = time.perf_counter() - t0
    assert batches == ["tiled", 1] and res["reused"] == 2 and res["n"] == 4
    assert sum(spent) <= 2 * res["decode_s"] <= wall
    assert all(torch.equal(_read(out / "reconstructions" / f"{n}.png"), png[n]) for n in "aw")
    # without skip_existing the PNGs in the folder are not kept: seed 1 writes its own
    with pytest.warns(UserWarning, match="skipping"):
        res = rf.reconstruct_files(tok, files, names, explicit, out, seed=1, batch_size=2, keys=keys)
    assert res["reused"] == 0 and batches[2:] == [2, "tiled", 1]
    assert all(not torch.equal(_read(out / "reconstructions" / f"{n}.png"), png[n]) for n in "abcw")
